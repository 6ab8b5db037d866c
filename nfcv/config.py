"""Configs: compose the packaged Hydra tree, resolve it to plain data, build a model from it."""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nfcv.errors import ConfigError
from nfcv.flows.base import Bijector
from nfcv.flows.conv1x1 import name_layers
from nfcv.model import ImageFlow
from nfcv.registry import build, resolved
from nfcv.schema import check_keys

CONFIG_MODULE = "nfcv.configs"


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose a config from the packaged tree, as the command-line tools do.

    ``nfcv.compose(["model=glow", "data=digits", "model.steps=4"])``.

    A train config's values are checked (`check_values`): a value no run can use is a
    `ConfigError` here, naming the key, the value and what is allowed.
    """
    check_overrides(overrides)
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
        check_keys(cfg)
        if config_name == "train":
            check_values(cfg)
        return cfg
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


# ------------------------------------------------------------------------------ value checks
#
# The schemas (nfcv/schema.py) fix each key's type; these rules fix the values a run can use, so a
# batch size of 0 fails while the config is composed, not in a DataLoader after the run folder and
# the Trainer exist. One rule per key: the test, and what is allowed (the message says it).


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(lo: int, hi: int | None = None) -> Callable[[Any], bool]:
    return lambda v: _whole(v) and v >= lo and (hi is None or v <= hi)


def _number(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    def ok(v: Any) -> bool:
        if not _real(v):
            return False
        return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

    return ok


def _or_null(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or rule(v)


def _image_shape(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_whole(s) and s >= 1 for s in v)


def _val_check_interval(v: Any, cfg: DictConfig) -> bool:
    """Steps between validations; a fraction of an epoch only with ``check_val_every_n_epoch``
    set (Lightning's rule). A time (``"00:01:00:00"``, a dict) is Lightning's to check."""
    if _whole(v):
        return v >= 1
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        every_epoch = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch", default=None)
        return _real(v) and 0 < v <= 1 and every_epoch is not None
    return True


# Sampling temperatures (sample.temperatures, nfcv-sample temperature=): 1 is the model's
# distribution; far above it the images are saturated noise, and inf or nan draw NaN.
MAX_TEMPERATURE = 100.0


def _temperatures(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_number(0, MAX_TEMPERATURE)(t) for t in v)


def _preprocess_for_dequant(v: Any, cfg: DictConfig) -> bool:
    """A logit preprocessing takes [0, 1] only; Gaussian noise augmentation leaves it."""
    dequant = OmegaConf.select(cfg, "dequant._target_", default=None)
    return not (v == "nfcv.flows.Logit" and dequant == "nfcv.dequant.GaussianDequantization")


def _patch_size(v: Any, cfg: DictConfig) -> bool:
    """A patch size (the transformer flows) that divides the image's height and width."""
    shape = OmegaConf.select(cfg, "model.image_shape", default=None)
    if not _whole(v) or v < 1:
        return False
    try:
        _, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        return True  # the image shape's own rule reports it
    return h % v == 0 and w % v == 0


def _divides_width(v: Any, cfg: DictConfig) -> bool:
    """A head size (TarFlow's head_dim) or head count (Jet's heads) that divides model.width."""
    width = OmegaConf.select(cfg, "model.width", default=None)
    return _whole(v) and v >= 1 and (not _whole(width) or width % v == 0)


@dataclass(frozen=True)
class Rule:
    key: str  # dotted path in the train config; a key the config does not have is skipped
    ok: Callable[[Any], bool] | Callable[[Any, DictConfig], bool]
    allowed: str  # completes "must be ..."
    with_config: bool = False  # `ok` takes the whole config too (a rule that reads another key)


def _spatial_splits(v: Any, cfg: DictConfig) -> bool:
    """Jet's spatial patterns must halve the grid of patch tokens (when `model.kinds` has
    spatial couplings)."""
    from nfcv.flows.jet import spatial_halves

    kinds = OmegaConf.select(cfg, "model.kinds", default=None)
    p = OmegaConf.select(cfg, "model.patch_size", default=None)
    shape = OmegaConf.select(cfg, "model.image_shape", default=None)
    if not isinstance(v, list) or "spatial" not in list(kinds or []):
        return True  # no spatial couplings; the types are the schema's to check
    if not v:
        return False
    if isinstance(shape, ListConfig):
        shape = OmegaConf.to_container(shape, resolve=True)
    if not (_whole(p) and p >= 1 and _image_shape(shape)):
        return True  # reported by their own rules
    try:
        for split in v:
            spatial_halves(str(split), (shape[1] // p, shape[2] // p))
    except ValueError:
        return False
    return True


MAX_SEED = 2**32 - 1  # what numpy's and Lightning's seeding take

VALUE_RULES: tuple[Rule, ...] = (
    Rule("seed", _integer(0, MAX_SEED), f"an integer in 0..{MAX_SEED}"),
    Rule("data.image_shape", _image_shape, "[channels, height, width], three integers >= 1"),
    Rule("data.num_bits", _integer(1, 8), "an integer in 1..8 (bits kept of each 8-bit value)"),
    Rule("data.num_bins", _integer(2), "an integer >= 2 (levels of a sub-pixel)"),
    Rule("data.batch_size", _integer(1), "an integer >= 1 (images per training step)"),
    Rule("data.eval_batch_size", _integer(1), "an integer >= 1 (images per evaluation batch)"),
    Rule(
        "data.num_workers",
        lambda v: v == "auto" or _integer(0)(v),
        "an integer >= 0 (0: load in the main process) or auto (the CPUs available, less one, "
        "shared between the training processes of a machine; at most 8)",
    ),
    Rule("model.image_shape", _image_shape, "[channels, height, width], three integers >= 1"),
    Rule(
        "dequant.noise_std",
        _number(0, lo_open=True),
        "a number > 0 (the std of the Gaussian noise in [0, 1] image units, e.g. 0.05)",
    ),
    Rule(
        "model.preprocess._target_",
        _preprocess_for_dequant,
        "a preprocessing defined on every real number with dequant=gaussian (its noise leaves "
        "[0, 1], and the logit takes [0, 1] only): use model=glow, nice, maf, hint or ffjord, "
        "or dequant=uniform|variational",
        with_config=True,
    ),
    Rule(
        "model.patch_size",
        _patch_size,
        "an integer >= 1 that divides the image's height and width (data.image_shape)",
        with_config=True,
    ),
    Rule(
        "model.head_dim",
        _divides_width,
        "an integer >= 1 that divides model.width (the width is split into heads of head_dim)",
        with_config=True,
    ),
    Rule(
        "model.heads",
        _divides_width,
        "an integer >= 1 that divides model.width (each attention head takes width / heads "
        "channels)",
        with_config=True,
    ),
    Rule(
        "model.spatial_splits",
        _spatial_splits,
        "patterns of checkerboard | vstripes | hstripes (each may end in -inv) that cut the "
        "grid of patch tokens into equal halves (an even number of tokens per row and column), "
        "or model.kinds=[channels] for no spatial couplings",
        with_config=True,
    ),
    Rule("optim.optimizer.lr", _number(0, lo_open=True), "a number > 0"),
    Rule("optim.warmup_steps", _integer(0), "an integer >= 0 (0: no warmup)"),
    Rule("trainer.max_steps", _integer(1), "an integer >= 1 (optimizer steps of the run)"),
    Rule(
        "trainer.val_check_interval",
        _val_check_interval,
        "an integer >= 1 (optimizer steps between validations), or a fraction of an epoch in "
        "(0, 1] with trainer.check_val_every_n_epoch set",
        with_config=True,
    ),
    Rule(
        "trainer.gradient_clip_val",
        _or_null(_number(0)),
        "a number >= 0, or null (0 and null: no clipping)",
    ),
    Rule("trainer.accumulate_grad_batches", _integer(1), "an integer >= 1"),
    Rule("callbacks.guard.max_bad_steps", _integer(1), "an integer >= 1 (bad steps in a row)"),
    Rule("callbacks.guard.lr_factor", _number(0, 1, lo_open=True), "a number in (0, 1]"),
    Rule("callbacks.guard.max_rollbacks", _integer(0), "an integer >= 0"),
    Rule("ema.decay", _or_null(_number(0, 1, True, True)), "a number in (0, 1), or null (off)"),
    Rule("sample.every_n_steps", _integer(0), "an integer >= 0 (0: no grids)"),
    Rule("sample.per_row", _integer(1), "an integer >= 1"),
    Rule("sample.reconstructions", _integer(0), "an integer >= 0"),
    Rule("sample.temperatures", _temperatures, "a list of one or more numbers in [0, 100]"),
)

_ABSENT = object()


def show(value: Any) -> str:
    """A config value as it is written on the command line: ``[1,0,8]``, ``null``, ``true``."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=True).strip('"')
    except (TypeError, ValueError):
        return str(value)


def check_values(cfg: DictConfig, rules: Iterable[Rule] = VALUE_RULES) -> None:
    """Raise `ConfigError` for the first value of a train config that a rule refuses, in one
    line: ``data.batch_size=0: must be an integer >= 1 (images per training step)``."""
    for rule in rules:
        try:
            value = OmegaConf.select(cfg, rule.key, default=_ABSENT, throw_on_missing=False)
        except OmegaConfBaseException:
            continue  # an interpolation that does not resolve: resolve() reports it
        if value is _ABSENT or OmegaConf.is_missing(cfg, rule.key):
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        if not (rule.ok(value, cfg) if rule.with_config else rule.ok(value)):
            raise ConfigError(f"{rule.key}={show(value)}: must be {rule.allowed}")


def check_machine(cfg: DictConfig) -> None:
    """Refuse a trainer this machine cannot run (``trainer=gpu`` without a GPU) before anything
    is built. Not part of `compose`: a config for another machine composes anywhere."""
    trainer = cfg.get("trainer") if isinstance(cfg, DictConfig) else None
    if not isinstance(trainer, DictConfig):
        return
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator not in ("gpu", "cuda"):
        return
    ddp = "ddp" in str(trainer.get("strategy", ""))
    fix = (
        "trainer=ddp_cpu" if ddp else "trainer=cpu, or trainer=default (the GPU when there is one)"
    )
    if not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator}, but PyTorch sees no CUDA GPU on this machine "
            f"(torch.cuda.is_available() is False): use {fix}"
        )
    devices, count = trainer.get("devices"), torch.cuda.device_count()
    if _whole(devices) and devices > count:
        raise ConfigError(
            f"trainer.devices={devices}, but this machine has {count} GPU(s): use "
            f"trainer.devices={count}, or run on a machine with {devices}"
        )


def check_run(cfg: DictConfig) -> None:
    """Everything `train` checks before it makes a folder: keys, values, and the machine."""
    check_keys(cfg)
    check_values(cfg)
    check_machine(cfg)


# Launchers of configs/hydra/launcher/ and what they need (the `cluster` extra).
CLUSTER_LAUNCHERS = ("local", "slurm")
CLUSTER_MODULES = ("hydra_plugins.hydra_submitit_launcher", "submitit")
_LAUNCHER = re.compile(r"^(?:\+\+|\+|override )?hydra/launcher=(\S+)$")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        return False


def check_overrides(overrides: Iterable[str]) -> None:
    """Command-line overrides that Hydra would fail on with a traceback: a launcher whose plugin
    is not installed (``hydra/launcher=slurm`` without the `cluster` extra)."""
    for override in overrides:
        match = _LAUNCHER.match(str(override).strip())
        if not match or match.group(1) not in CLUSTER_LAUNCHERS:
            continue
        missing = [m for m in CLUSTER_MODULES if not _installed(m)]
        if missing:
            raise ConfigError(
                f"hydra/launcher={match.group(1)} needs the cluster extra "
                f"(hydra-submitit-launcher; {', '.join(missing)} is not installed): "
                "pip install 'nfcv[cluster]'"
            )


def _root_message(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config, interpolations resolved, as plain containers (what checkpoints keep)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"the config does not resolve: {str(err).splitlines()[0]}. Check the spelling of the "
            "overridden values (e.g. model.coupling and model.permutation take the names listed "
            "under model.choices)"
        ) from err


def build_model(cfg: DictConfig | Mapping[str, Any], *, source: str = "the config") -> ImageFlow:
    """An untrained `ImageFlow` from a train config (its ``model`` and ``dequant`` groups).

    Only classes in `nfcv.registry` are built (`nfcv.registry.build`, never Hydra's
    ``instantiate``): a class of your own needs ``nfcv.register``. `source` names the config in
    errors (the file, for a loaded checkpoint)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    model_cfg = cfg.model
    name = model_cfg.get("name", "model")
    try:
        flow = build(resolved(model_cfg.flow), source=source, where="model.flow")
        preprocess = model_cfg.get("preprocess")
        if preprocess:
            preprocess = build(resolved(preprocess), source=source, where="model.preprocess")
        dequantizer = cfg.get("dequant")
        if dequantizer:
            dequantizer = build(resolved(dequantizer), source=source, where="dequant")
        for key, obj in (("model.flow", flow), ("model.preprocess", preprocess)):
            if obj is not None and not isinstance(obj, Bijector):
                raise ConfigError(
                    f"{key} must build an nfcv Bijector, got {type(obj).__name__}: check its "
                    "_target_"
                )
        num_classes = None
        if model_cfg.get("conditional", False):
            num_classes = model_cfg.get("num_classes")
            if not num_classes:
                raise ConfigError(
                    "model.conditional=true needs model.num_classes: nfcv-train sets it from a "
                    "labelled dataset; with nfcv.build_model set it yourself"
                )
        model = ImageFlow(
            flow,
            image_shape=tuple(model_cfg.image_shape),
            num_bins=int(model_cfg.num_bins),
            dequantizer=dequantizer,
            preprocess=preprocess,
            num_classes=num_classes,
        )
        if model_cfg.get("checkpoint_grads", False):
            model.checkpoint_networks(True)
        name_layers(model)  # a singular 1x1 conv is reported by its path in the model
        model.config = cfg
        return model
    except ConfigError:
        raise
    except (TypeError, ValueError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot build model '{name}': {_root_message(err)}") from err
