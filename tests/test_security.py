"""Loading a checkpoint or an export builds registered classes only (nfcv/registry.py,
docs/security.md).

A stored config is a file's data. Each hostile config below would create (or truncate) a marker
file if it were built the way Hydra builds configs; loading it must refuse it with exit status 2
and a message naming what was refused, and the marker must not exist. Checked through
`nfcv.load` for ``.ckpt`` and ``.safetensors`` (cheap, every payload) and through nfcv-eval,
nfcv-sample and nfcv-export as subprocesses (a representative few, run side by side).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import pkgutil
import random
import shlex
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

import nfcv
from nfcv.errors import CheckpointError, ConfigError, NfcvError

BIN = Path(sys.executable).parent


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny training run, watching how Lightning reads the best checkpoint for testing:
    the ``weights_only`` each ``Trainer.test`` call gets, and Lightning's log and warnings."""
    import lightning as L
    from conftest import _tiny_overrides

    from nfcv.cli.train import train

    calls: list[Any] = []
    original = L.Trainer.test

    def test(self, *args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(self, *args, **kwargs)

    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger("lightning.pytorch")
    handler, level = Catch(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mp.setattr(L.Trainer, "test", test)
            summary = train(
                nfcv.compose(_tiny_overrides()),
                run_dir=tmp_path_factory.mktemp("security") / "run",
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages += [str(w.message) for w in caught]
    return {"summary": summary, "test_weights_only": calls, "messages": messages}


@pytest.fixture(scope="module")
def ckpt(run) -> Path:
    return Path(run["summary"]["last_ckpt"])


@pytest.fixture(scope="module")
def export(ckpt, tmp_path_factory):
    """A real export's tensors and metadata, to write hostile exports from."""
    from safetensors.torch import load_file, safe_open

    from nfcv.export import export_safetensors

    out = export_safetensors(ckpt, tmp_path_factory.mktemp("export") / "m.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(out)), meta


# ------------------------------------------------------------------------------------- payloads


class _RunsOnUnpickle:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# name -> (key path in the stored config, what the refusal must name). Each value is made by
# `_payload` in a folder of its own; under Hydra's instantiate (the code before nfcv.registry)
# every payload but os_system, unknown_keyword, recursive, env and optimizer_prefix creates
# <name>.marker in it (os_system: Hydra 1.3.8 blocklists os.system itself; the other four are
# refused for what they are rather than for a marker).
PAYLOADS = {
    # os.open(path, O_CREAT | O_WRONLY | O_TRUNC): creates or empties any file.
    "os_open": (("model", "flow"), "'nfcv.api.os.open' at model.flow"),
    "path_touch": (("model", "preprocess"), "'nfcv.api.Path.touch' at model.preprocess"),
    # torch.load(weights_only=False) of a pickle: any code, nested deep in the flow.
    "torch_load": (
        ("model", "flow", "step", 2, "net"),
        "'nfcv.api.torch.load' at model.flow.step[2].net",
    ),
    "copyfile": (("dequant",), "'nfcv.data.shutil.copyfile' at dequant"),
    "os_system": (("model", "flow"), "'nfcv.api.os.system' at model.flow"),
    # OmegaConf builds the node when the config is read: no _target_ in the stored dictionary.
    "oc_create": (("model", "preprocess"), "${oc.create:"),
    "args": (("model", "preprocess"), "'_args_' at model.preprocess"),
    "recursive": (("model", "preprocess"), "'_recursive_' at model.preprocess"),
    "unknown_keyword": (("model", "preprocess"), "'bogus' is not a parameter of nfcv.flows.Shift"),
    "env": (("sample", "temperatures", 0), "${oc.env:HOME}"),
    # The data module nfcv-eval builds: torch.hub.load of a local folder runs its hubconf.py.
    "data_hub": (("data",), "'nfcv.data.torch.hub.load' at data"),
    "optimizer_prefix": (
        ("optim", "optimizer", "_target_"),
        "'torch.optim.adam.torch.load'",
    ),
}


def _payload(name: str, d: Path) -> Any:
    marker = str(d / f"{name}.marker")
    if name == "os_open":
        flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC
        return {"_target_": "nfcv.api.os.open", "path": marker, "flags": flags}
    if name == "path_touch":
        return {"_target_": "nfcv.api.Path.touch", "self": marker}
    if name == "torch_load":
        torch.save({"x": _RunsOnUnpickle(f"touch {shlex.quote(marker)}")}, d / "evil.pt")
        return {"_target_": "nfcv.api.torch.load", "f": str(d / "evil.pt"), "weights_only": False}
    if name == "copyfile":
        (d / "anything").write_text("overwritten")
        return {"_target_": "nfcv.data.shutil.copyfile", "src": str(d / "anything"), "dst": marker}
    if name == "os_system":
        return {"_target_": "nfcv.api.os.system", "command": f"touch {shlex.quote(marker)}"}
    if name == "oc_create":
        return "${oc.create:{_target_: nfcv.api.Path.touch, self: '" + marker + "'}}"
    if name == "args":
        touch = {"_target_": "nfcv.api.Path.touch", "self": marker}
        return {"_target_": "nfcv.flows.Shift", "_args_": [touch]}
    if name == "recursive":
        return {"_target_": "nfcv.flows.Shift", "_recursive_": False, "offset": -0.5}
    if name == "unknown_keyword":
        return {"_target_": "nfcv.flows.Shift", "offset": -0.5, "bogus": 1}
    if name == "env":
        return "${oc.env:HOME}"
    if name == "data_hub":
        (d / "hub").mkdir()
        (d / "hub" / "hubconf.py").write_text(
            f"import pathlib\npathlib.Path({marker!r}).touch()\n\ndef x(**kwargs):\n    pass\n"
        )
        return {
            "_target_": "nfcv.data.torch.hub.load",
            "repo_or_dir": str(d / "hub"),
            "model": "x",
            "source": "local",
            "name": "digits",
            "image_shape": [1, 8, 8],
            "num_bins": 17,
            "eval_batch_size": 512,
        }
    if name == "optimizer_prefix":
        return "torch.optim.adam.torch.load"
    raise KeyError(name)


def _hostile_cfg(cfg: dict, name: str, d: Path) -> dict:
    cfg = copy.deepcopy(cfg)
    *parents, last = PAYLOADS[name][0]
    node = cfg
    for key in parents:
        node = node[key]
    node[last] = _payload(name, d)
    return cfg


def _hostile_ckpt(ckpt: Path, name: str, d: Path) -> Path:
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"]["cfg"] = _hostile_cfg(state["hyper_parameters"]["cfg"], name, d)
    torch.save(state, d / f"{name}.ckpt")
    return d / f"{name}.ckpt"


def _hostile_export(export, name: str, d: Path) -> Path:
    from safetensors.torch import save_file

    tensors, meta = export
    cfg = _hostile_cfg(json.loads(meta["nfcv_config"]), name, d)
    path = d / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={**meta, "nfcv_config": json.dumps(cfg)})
    return path


def _assert_refused(message: str, name: str, path: Path, d: Path) -> None:
    assert not (d / f"{name}.marker").exists(), f"{name}: the payload ran"
    assert PAYLOADS[name][1] in message, message
    assert str(path) in message, message


# ------------------------------------------------------------------------------- through the API


def _load_error(path: Path) -> NfcvError | None:
    try:
        nfcv.load(path)
    except NfcvError as err:
        return err
    return None


@pytest.mark.parametrize("name", list(PAYLOADS))
@pytest.mark.parametrize("kind", ["ckpt", "safetensors"])
def test_load_refuses_hostile_configs(name, kind, ckpt, export, tmp_path):
    path = (
        _hostile_ckpt(ckpt, name, tmp_path)
        if kind == "ckpt"
        else _hostile_export(export, name, tmp_path)
    )
    err = _load_error(path)
    assert not (tmp_path / f"{name}.marker").exists(), f"{name}: the payload ran"
    assert err is not None, f"{name}: the file loaded"
    # A key that is not a parameter is found while building (ConfigError); the rest before.
    assert type(err) is (ConfigError if name == "unknown_keyword" else CheckpointError), err
    _assert_refused(str(err), name, path, tmp_path)


def test_data_module_refuses_a_hostile_data_config(ckpt, tmp_path):
    """nfcv-eval and nfcv-sample build the checkpoint's data config: checked there too, for a
    model whose config did not come through nfcv.load's check."""
    from omegaconf import OmegaConf

    from nfcv.cli.common import data_module

    model = nfcv.load(ckpt)
    model.config.data = _payload("data_hub", tmp_path)
    try:
        data_module(OmegaConf.create({"data": None, "root": None, "download": None}), model)
    except CheckpointError as err:
        error = err
    else:
        error = None
    assert not (tmp_path / "data_hub.marker").exists(), "the payload ran"
    assert error is not None and PAYLOADS["data_hub"][1] in str(error)


def test_registered_classes_still_load(ckpt, export, tmp_path):
    model = nfcv.load(ckpt)
    from safetensors.torch import save_file

    tensors, meta = export
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata=meta)
    again = nfcv.load(tmp_path / "m.safetensors")
    x = torch.randint(0, 17, (3, 1, 8, 8)).float()
    torch.manual_seed(0)
    a = model.bits_per_dim(x)
    torch.manual_seed(0)
    torch.testing.assert_close(a, again.bits_per_dim(x))


# ------------------------------------------------------------------------------ the commands


def _start(cmd: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "NFCV_CACHE": str(cwd / "cache"), "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [str(BIN / cmd), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# (command, payload, file kind): every command, both kinds of file, the data path of nfcv-eval.
COMMANDS = [
    ("nfcv-eval", "data_hub", "ckpt"),
    ("nfcv-sample", "torch_load", "ckpt"),
    ("nfcv-export", "oc_create", "ckpt"),
    ("nfcv-eval", "os_open", "safetensors"),
]


@pytest.fixture(scope="module")
def commands(ckpt, export, tmp_path_factory):
    """Each of `COMMANDS` on its hostile file, started side by side (startup is most of the
    time); -> {(command, payload, kind): (returncode, stderr, path, folder)}."""
    started = {}
    for cmd, name, kind in COMMANDS:
        d = tmp_path_factory.mktemp(f"{cmd}-{name}")
        path = _hostile_ckpt(ckpt, name, d) if kind == "ckpt" else _hostile_export(export, name, d)
        args = [f"ckpt={path}", f"out={d / 'out'}"]
        if cmd == "nfcv-eval":
            args.append("progress=false")
        started[(cmd, name, kind)] = (_start(cmd, *args, cwd=d), path, d)
    done = {}
    for key, (proc, path, d) in started.items():
        _, stderr = proc.communicate(timeout=600)
        done[key] = (proc.returncode, stderr, path, d)
    return done


@pytest.mark.parametrize("case", COMMANDS, ids=["-".join(c) for c in COMMANDS])
def test_commands_refuse_hostile_files(case, commands):
    returncode, stderr, path, d = commands[case]
    assert not (d / f"{case[1]}.marker").exists(), f"{case[1]}: the payload ran\n{stderr}"
    assert returncode == 2, stderr
    assert stderr.startswith("nfcv: error: refusing to"), stderr
    assert "Traceback" not in stderr
    _assert_refused(stderr, case[1], path, d)


# ------------------------------------------------------------------------- training's own load


def test_training_reads_the_best_checkpoint_weights_only(run):
    """trainer.test(ckpt_path=best) reads with weights_only=True, and nothing says
    weights_only was left unset (Lightning logs that when a save does not say which)."""
    assert run["test_weights_only"] == [True]
    assert not [m for m in run["messages"] if "weights_only" in m]


# ---------------------------------------------------------------------------------- the registry


def _import_all_nfcv() -> None:
    for info in pkgutil.walk_packages(nfcv.__path__, "nfcv."):
        if not info.name.startswith("nfcv.configs"):
            importlib.import_module(info.name)


def _modules() -> dict[str, Any]:
    _import_all_nfcv()
    import lightning  # noqa: F401
    import torch.optim  # noqa: F401

    prefixes = ("nfcv", "torch.optim", "lightning")
    return {
        name: module
        for name, module in sorted(sys.modules.items())
        if module is not None
        and (name in prefixes or name.startswith(tuple(p + "." for p in prefixes)))
    }


def _get(obj: Any, attr: str) -> Any:
    try:
        return getattr(obj, attr)
    except Exception:  # a lazy attribute that fails to import, a descriptor that raises
        return None


def _attrs(obj: Any) -> list[str]:
    try:
        return sorted(dir(obj))
    except Exception:  # an object whose __dir__ fails: nothing to walk
        return []


def test_no_attribute_path_under_the_allowed_prefixes_resolves():
    """For every module under nfcv., torch.optim. and lightning. and each attribute of it
    (and for a sample, each attribute of that): `lookup` of the dotted path fails unless that
    exact path is a registered name, and then it is the very object the path leads to."""
    from hydra._internal.utils import _locate

    from nfcv.registry import NotRegisteredError, is_registered, lookup

    modules = _modules()
    assert len(modules) > 100 and "nfcv.api" in modules and "torch.optim" in modules
    rng = random.Random(0)
    checked = resolved = 0

    def check(path: str, owner: Any, attr: str) -> None:
        nonlocal checked, resolved
        checked += 1
        try:
            found = lookup(path)
        except NotRegisteredError:
            assert not is_registered(path)
            return
        resolved += 1
        assert is_registered(path) and isinstance(found, type), path
        assert found is _get(owner, attr), path

    for name, module in modules.items():
        attrs = _attrs(module)
        for attr in attrs:
            check(f"{name}.{attr}", module, attr)
        for attr in rng.sample(attrs, min(len(attrs), 8)):
            obj = _get(module, attr)
            inner = _attrs(obj)
            for attr2 in rng.sample(inner, min(len(inner), 8)):
                check(f"{name}.{attr}.{attr2}", obj, attr2)
    assert checked > 20_000
    assert resolved >= 40  # the registered names reachable as module.attr (nfcv.flows.X...)
    # The paths of the payloads: Hydra finds each of them by walking attributes; lookup does not.
    for path in [
        "nfcv.api.os.open",
        "nfcv.api.os.system",
        "nfcv.api.torch.load",
        "nfcv.api.Path.touch",
        "nfcv.data.shutil.copyfile",
        "nfcv.data.torch.hub.load",
        "torch.optim.adam.torch.load",
        "lightning.pytorch.trainer.trainer.torch.load",
        "nfcv.flows.ActNorm.__init__",
        "nfcv.flows.base.Bijector",
    ]:
        assert callable(_locate(path)), path
        with pytest.raises(NotRegisteredError, match="register"):
            lookup(path)


def test_registry_holds_every_target_the_configs_name():
    """Every ``_target_`` in the packaged configs is registered under that exact string, but
    the two that training builds itself with Hydra (never a load)."""
    import re

    from nfcv.registry import RECORDED_ONLY, is_registered, lookup

    configs = Path(nfcv.__file__).parent.parent / "configs"
    if not configs.is_dir():  # installed, not from the source tree
        configs = Path(importlib.import_module("nfcv.configs").__file__).parent
    targets = {
        m.group(1)
        for f in configs.rglob("*.yaml")
        for m in re.finditer(r"_target_:\s*([\w.]+)", f.read_text())
    }
    assert len(targets) > 30
    trained_only = {*RECORDED_ONLY.values(), "nfcv.sweep.SweepReport"}
    for target in sorted(targets - trained_only):
        assert is_registered(target), target
        module, _, attr = target.rpartition(".")
        assert lookup(target) is getattr(importlib.import_module(module), attr)
    for name in ("AdamW", "SGD"):
        assert lookup(f"torch.optim.{name}") is getattr(torch.optim, name)


def test_registry_holds_every_flows_class_and_data_module():
    import nfcv.data
    import nfcv.flows
    from nfcv.registry import DATA_MODULES, lookup

    for attr in nfcv.flows.__all__:
        obj = getattr(nfcv.flows, attr)
        if isinstance(obj, type):
            assert lookup(f"nfcv.flows.{attr}") is obj
    data_modules = {
        name
        for name, obj in vars(nfcv.data).items()
        if isinstance(obj, type)
        and issubclass(obj, nfcv.data.ImageDataModule)
        and obj.__module__.startswith("nfcv.data")
        and not name.startswith("_")
        and name not in ("ImageDataModule", "LocalDataModule")  # bases, no data of their own
    }
    assert set(DATA_MODULES) == data_modules
    for name in DATA_MODULES:
        assert lookup(f"nfcv.data.{name}") is getattr(nfcv.data, name)


@pytest.fixture
def registry(monkeypatch):
    """nfcv.registry, with whatever a test registers forgotten afterwards."""
    from nfcv import registry

    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    return registry


def test_a_class_of_your_own_loads_once_registered(registry, ckpt, tmp_path):
    class MyShift(nfcv.flows.Shift):
        pass

    state = torch.load(ckpt, weights_only=True)
    cfg = state["hyper_parameters"]["cfg"]
    name = f"{MyShift.__module__}.{MyShift.__qualname__}"
    cfg["model"]["preprocess"] = {"_target_": name, "offset": -0.5}
    torch.save(state, tmp_path / "mine.ckpt")
    with pytest.raises(CheckpointError, match=r"nfcv\.registry\.register\(YourClass\)"):
        nfcv.load(tmp_path / "mine.ckpt")
    assert registry.register(MyShift) is MyShift  # also a decorator: @register
    assert type(nfcv.load(tmp_path / "mine.ckpt").preprocess) is MyShift

    @registry.register(name="my.Shift")
    class Other(nfcv.flows.Shift):
        pass

    assert registry.lookup("my.Shift") is Other
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Other, name="nfcv.flows.Shift")
    with pytest.raises(TypeError):
        registry.register(os.system)


BAD_NODES = {
    "args": ({"_target_": "nfcv.flows.Shift", "_args_": [0.5]}, "'_args_'"),
    "recursive": ({"_target_": "nfcv.flows.Shift", "_recursive_": False}, "'_recursive_'"),
    "convert": ({"_target_": "nfcv.flows.Shift", "_convert_": "all"}, "'_convert_'"),
    "other_special": ({"_target_": "nfcv.flows.Shift", "_set_": 1}, "'_set_'"),
    "special_without_target": ({"x": {"_args_": [1]}}, "'_args_'"),
    "unknown_keyword": ({"_target_": "nfcv.flows.Shift", "scale": 2}, "'scale' is not a param"),
    "partial_not_bool": ({"_target_": "nfcv.flows.Shift", "_partial_": "yes"}, "'yes'"),
    "interpolation": ({"_target_": "nfcv.flows.Shift", "offset": "${x}"}, "interpolation"),
    "unregistered": ({"_target_": "builtins.print"}, "'builtins.print' is not a registered"),
    "not_a_string": ({"_target_": ["nfcv.flows.Shift"]}, "is not a registered"),
    # **kwargs passed on to a base class admit that class's names only.
    "kwargs_chain": (
        {
            "_target_": "nfcv.data.DigitsDataModule",
            "image_shape": [1, 8, 8],
            "num_bins": 17,
            "bogus": 1,
        },
        "'bogus' is not a parameter of nfcv.data.DigitsDataModule",
    ),
}


@pytest.mark.parametrize("name", list(BAD_NODES))
def test_build_refuses(name):
    from omegaconf import OmegaConf

    from nfcv.registry import build

    node, message = BAD_NODES[name]
    with pytest.raises(ConfigError, match="refusing to build") as err:
        build(node, source="test.yaml")
    assert message in str(err.value) and "test.yaml" in str(err.value)
    if name == "interpolation":  # a DictConfig's interpolations are refused, never resolved
        with pytest.raises(ConfigError, match="interpolation"):
            build(OmegaConf.create({"x": 0, "y": node}).y)


def test_build_makes_partials_lists_and_nested_objects():
    import functools

    from nfcv.registry import build, parameters

    made = build(
        {
            "_target_": "nfcv.flows.MultiScale",
            "image_shape": [1, 8, 8],
            "num_levels": 2,
            "steps_per_level": 1,
            "step": [
                {"_target_": "nfcv.flows.ActNorm", "_partial_": True},
                {
                    "_target_": "nfcv.flows.AffineCoupling",
                    "_partial_": True,
                    "net": {
                        "_target_": "nfcv.flows.GlowNet",
                        "_partial_": True,
                        "hidden_channels": 4,
                    },
                },
            ],
        }
    )
    assert isinstance(made, nfcv.flows.MultiScale)
    opt = build({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1})
    assert isinstance(opt, functools.partial) and opt.func is torch.optim.Adam
    assert {"image_shape", "num_bins", "test_size", "batch_size"} <= parameters(
        importlib.import_module("nfcv.data").DigitsDataModule
    )
