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
