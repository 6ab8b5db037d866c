"""Structured-config schemas (nfcv/schema.py): every option of the typed groups is a typed node,
and a mistyped key or a wrong type fails while the config is composed, with Hydra's message."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import lightning
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import nfcv
from nfcv import schema
from nfcv.errors import ConfigError

CONFIGS = Path(nfcv.__file__).resolve().parent.parent / "configs"
TYPED_GROUPS = ("data", "model", "dequant", "optim", "trainer")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in TYPED_GROUPS for o in _options(g)])
def test_every_option_of_a_typed_group_has_a_schema(group, option):
    """A new yaml file in these groups must start from a schema, or this fails."""
    cfg = nfcv.compose([f"{group}={option}"])
    node_type = OmegaConf.get_type(cfg[group])
    assert dataclasses.is_dataclass(node_type), (group, option, node_type)
    assert node_type.__module__ == "nfcv.schema"
    assert node_type in schema.SCHEMAS[group].values()


# One mistyped key and one value of the wrong type per group, and OmegaConf's words for it.
CASES = {
    "data": ("data.bach_size=32", "data.batch_size=lots", "could not be converted to Integer"),
    "model": ("model.hiden=64", "model.steps=four", "could not be converted to Integer"),
    "dequant": (
        "dequant.num_step=2",
        "dequant.num_steps=2.5",
        "could not be converted to Integer",
    ),
    "optim": (
        "optim.warmup_step=10",
        "optim.warmup_steps=soon",
        "could not be converted to Integer",
    ),
    "trainer": ("trainer.max_step=10", "trainer.sync_batchnorm=maybe", "is not a valid bool"),
}


@pytest.mark.parametrize("group", TYPED_GROUPS)
def test_a_mistyped_key_fails_at_composition(group):
    extra = ["dequant=variational"] if group == "dequant" else []
    typo = CASES[group][0]
    with pytest.raises(
        ConfigCompositionException, match=f"Could not override '{typo[: typo.index('=')]}'"
    ):
        nfcv.compose([*extra, typo])


@pytest.mark.parametrize("group", TYPED_GROUPS)
def test_a_key_added_with_plus_that_the_group_lacks_fails(group):
    """``+model.hiden=64`` adds a key even to a typed node; nfcv rejects it after composing,
    naming the key and the closest setting, before anything is built or read."""
    extra = ["dequant=variational"] if group == "dequant" else []
    typo = CASES[group][0]
    key = typo[: typo.index("=")]
    with pytest.raises(ConfigError, match=rf"{key} is not a setting of {group}.*did you mean"):
        nfcv.compose([*extra, "+" + typo])


@pytest.mark.parametrize("group", TYPED_GROUPS)
def test_a_value_of_the_wrong_type_fails_at_composition(group):
    extra = ["dequant=variational"] if group == "dequant" else []
    _, bad, expected = CASES[group]
    with pytest.raises(ConfigCompositionException) as info:
        nfcv.compose([*extra, bad])
    chain = []
    err: BaseException | None = info.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    message = "\n".join(chain)
    assert expected in message, message
    assert f"full_key: {bad[: bad.index('=')]}" in message, message


def test_the_right_types_still_convert():
    cfg = nfcv.compose(
        ["data.batch_size=16", "model.dropout=0", "trainer.max_epochs=null", "data.val_size=null"]
    )
    assert cfg.data.batch_size == 16 and isinstance(cfg.model.dropout, float)
    assert cfg.trainer.max_epochs is None and cfg.data.val_size is None
    # A Trainer argument that no yaml file sets is in the schema: no `+` needed.
    assert nfcv.compose(["trainer.accumulate_grad_batches=4"]).trainer.accumulate_grad_batches == 4


def test_a_mistyped_key_in_a_users_config_file_fails(tmp_path):
    """A config file of one's own (here a model extending glow) is checked the same way."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text(
        "defaults:\n  - glow\n  - _self_\nname: mine\nhiden: 64\n"
    )
    with pytest.raises(ConfigCompositionException) as info:
        nfcv.compose([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])
    assert "Key 'hiden' not in 'GlowSchema'" in str(info.value)
    (tmp_path / "model" / "mine.yaml").write_text(
        "defaults:\n  - glow\n  - _self_\nname: mine\nhidden: 64\n"
    )
    cfg = nfcv.compose([f"hydra.searchpath=[file://{tmp_path}]", "model=mine"])
    assert cfg.model.hidden == 64


def test_maf_keeps_glows_keys_and_adds_its_own():
    cfg = nfcv.compose(["model=maf", "model.autoregressive=iaf", "model.hidden=8"])
    assert OmegaConf.get_type(cfg.model) is schema.MAFSchema
    with pytest.raises(ConfigCompositionException, match="model.autoregressive"):
        nfcv.compose(["model=glow", "model.autoregressive=iaf"])  # only MAF has it


def test_trainer_schema_is_lightning_trainers_signature():
    """Every field is an argument of lightning.Trainer with its default (an unknown one would
    break every run), and with Lightning 2.6 every argument but the four nfcv passes itself
    is a field (a later Lightning may add arguments: they are then not settable yet)."""
    params = {
        name: p.default
        for name, p in inspect.signature(lightning.Trainer.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    fields = {f.name: f.default for f in dataclasses.fields(schema.TrainerSchema)}
    assert fields.pop("_target_") == "lightning.Trainer"
    assert set(fields) <= set(params) - set(schema.TRAINER_OWN)
    if lightning.__version__.startswith("2.6."):
        assert set(fields) == set(params) - set(schema.TRAINER_OWN)
    for name, default in fields.items():
        assert default == params[name], (name, default, params[name])


def _nfcv_train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(Path(sys.executable).parent / "nfcv-train"), *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        timeout=300,
        check=False,
    )


def test_cli_fails_before_reading_data(tmp_path):
    """`nfcv-train` with a bad value exits non-zero with Hydra's message, before the data is
    read (the data root does not exist) and before the run folder is made; a key added with
    `+` that the group lacks exits 2 before training starts."""
    run_dir = tmp_path / "run"
    missing_data = [
        "data=cifar10",
        f"data.root={tmp_path / 'nowhere'}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = _nfcv_train(*missing_data, "model.steps=four")
    assert proc.returncode != 0
    assert "Value 'four' of type 'str' could not be converted to Integer" in proc.stderr
    assert "full_key: model.steps" in proc.stderr
    assert "cifar" not in proc.stderr.lower().replace("data=cifar10", "")
    assert not run_dir.exists()

    proc = _nfcv_train(*missing_data, "+data.bach_size=8")
    assert proc.returncode == 2, proc.stderr
    assert "data.bach_size is not a setting of data" in proc.stderr
    assert "did you mean data.batch_size?" in proc.stderr
    assert not (run_dir / "checkpoints").exists()


# ------------------------------------------------------------------------ defaults said once
#
# The rule: a yaml file of a typed group holds the values users run; its schema declares the
# keys and their types. A schema field's default is either `???` (MISSING: every yaml file that
# uses the key sets it) or the value every yaml file of that schema that sets the key agrees
# with (a file may repeat it, to carry the comment that documents it, but never contradict
# it). A default that no run gets is a second, wrong, statement of the value.
#
# The trainer group is the exception: TrainerSchema mirrors lightning.Trainer's signature with
# Lightning's defaults (test_trainer_schema_is_lightning_trainers_signature), and
# configs/trainer/*.yaml are nfcv's choices where they differ from Lightning's, so a trainer
# file's value that differs from the schema's is the point of the file, not a disagreement.
DEFAULT_GROUPS = ("data", "model", "dequant", "optim")


def _schema_entry(entry) -> tuple[str | None, str | None]:
    """(schema name, parent yaml name) named by one entry of a file's defaults list."""
    if isinstance(entry, str):
        return (None, None) if entry == "_self_" else (None, entry)
    ((key, value),) = entry.items()
    key = key.removeprefix("override ").strip()
    if key.startswith("/schema/"):
        return value, None
    return None, None  # another group placed inside this node (e.g. /layer@choices...)


def _schema_of(group: str, option: str) -> type:
    """The schema class a yaml file of `group` composes onto: the one its own defaults list
    names (an `override` wins), else its parent file's, read from the files, not composed."""
    own = OmegaConf.load(CONFIGS / group / f"{option}.yaml")
    named, parent = None, None
    for entry in OmegaConf.to_container(own.get("defaults", [])):
        name, base = _schema_entry(entry)
        named = name or named
        parent = parent or base
    if named is not None:
        return schema.SCHEMAS[group][named]
    assert parent is not None, f"configs/{group}/{option}.yaml extends no schema"
    return _schema_of(group, parent)


def _schema_defaults(cls: type) -> dict:
    """Each field of a schema with its default (MISSING is the string '???')."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _default_disagreements(group: str, option: str) -> list[str]:
    cls = _schema_of(group, option)
    # The file's own values, unresolved: an interpolation is a value that differs from a default.
    own = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))
    found = []
    for key, default in _schema_defaults(cls).items():
        if default == "???" or key not in own or own[key] == default:
            continue
        found.append(
            f"{cls.__name__}.{key} = {default!r}, configs/{group}/{option}.yaml: {own[key]!r}"
        )
    return found


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in DEFAULT_GROUPS for o in _options(g)]
)
def test_schema_defaults_agree_with_the_yaml_files(group, option):
    """Every default a schema gives equals the value of each yaml file (of the groups above,
    extending that schema directly or through another file) that sets the key. Make the schema's
    default `???` when the files differ, or the file's value when it alone sets it."""
    assert not _default_disagreements(group, option)


def test_the_default_check_finds_a_disagreement(monkeypatch):
    """The check above fails on a schema default that a file contradicts (glow.yaml's dropout)."""
    field = next(f for f in dataclasses.fields(schema.GlowSchema) if f.name == "dropout")
    monkeypatch.setattr(field, "default", 0.123)
    assert _default_disagreements("model", "glow") == [
        "GlowSchema.dropout = 0.123, configs/model/glow.yaml: 0.2"
    ]
