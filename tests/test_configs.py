"""Every option of every config group composes, and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import nfcv

CONFIGS = Path(nfcv.__file__).resolve().parent.parent / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_the_tree_has_the_documented_groups():
    assert {"model", "data", "dequant", "optim", "trainer", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in GROUPS if g not in ("experiment", "layer") for o in _options(g)],
)
def test_every_option_composes_and_instantiates(group, option):
    cfg = nfcv.compose([f"{group}={option}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "model":
        model = nfcv.build_model(cfg)
        assert model.image_shape == tuple(cfg.data.image_shape)
    elif group == "data":
        dm = instantiate(cfg.data)  # building reads no files
        assert dm.image_shape == tuple(cfg.data.image_shape) and dm.num_bins >= 2
    elif group == "trainer":
        trainer = instantiate(cfg.trainer, accelerator="cpu", logger=False)
        assert trainer.max_steps == cfg.trainer.max_steps
    elif group == "dequant":
        assert isinstance(instantiate(cfg.dequant), nfcv.dequant.Dequantizer)
    elif group == "optim":
        import torch

        opt = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2))])
        assert opt.param_groups[0]["lr"] == cfg.optim.optimizer.lr


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_composes_and_builds(option):
    cfg = nfcv.compose([f"experiment={option}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.data.name != "digits"  # each pins its own dataset
    model = nfcv.build_model(cfg)
    assert model.image_shape == tuple(cfg.data.image_shape)


def test_configs_ship_inside_the_package():
    import importlib.resources

    root = importlib.resources.files("nfcv.configs")
    assert root.joinpath("train.yaml").is_file()
    assert root.joinpath("model").joinpath("glow.yaml").is_file()


def test_sample_and_eval_configs_compose():
    for name in ("sample", "eval"):
        cfg = nfcv.compose(["ckpt=x.ckpt"], config_name=name)
        assert cfg.ckpt == "x.ckpt"
