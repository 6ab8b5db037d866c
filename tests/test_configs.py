"""Every option of every config group composes, and its objects instantiate."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import nfcv

CONFIGS = Path(nfcv.__file__).resolve().parent.parent / "configs"
# Every group, nested ones too (hydra/launcher): any folder of the tree holding a yaml file.
GROUPS = sorted(
    p.parent.relative_to(CONFIGS).as_posix()
    for p in CONFIGS.rglob("*.yaml")
    if p.parent != CONFIGS and not p.parent.name.startswith("_")
)
GROUPS = sorted(set(GROUPS))
ROOT_CONFIGS = sorted(p.stem for p in CONFIGS.glob("*.yaml"))  # train, sample, eval, export
# How each group is checked below; a new group fails test_every_config_file_is_covered.
INSTANTIATED = ("model", "data", "trainer", "dequant", "optim")
CHECKED_ELSEWHERE = ("experiment", "layer", "hydra/launcher", "callbacks", "logger")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_every_config_file_is_covered():
    """Every yaml file of the tree is one of the root configs or an option of a group that a
    test below composes and instantiates, so a new file or group cannot slip past them."""
    assert set(GROUPS) == set(INSTANTIATED) | set(CHECKED_ELSEWHERE), GROUPS
    for path in CONFIGS.rglob("*.yaml"):
        group = path.parent.relative_to(CONFIGS).as_posix()
        assert group == "." or group in GROUPS, path
    assert set(ROOT_CONFIGS) == {"train", "sample", "eval", "export"}


@pytest.mark.parametrize("option", _options("layer"))
def test_every_layer_config_builds(option):
    # Token layers (the transformer flows) take (N, D): N tokens of D values.
    shape = {"ffjord": (2, 2, 2), "tarflow_block": (5, 3), "jet_coupling": (4, 6)}
    shape = shape.get(option, (4, 4, 4))
    layer = nfcv.build_layer(option, shape)
    assert isinstance(layer, nfcv.flows.base.Bijector)
    assert option in nfcv.layer_names()


@pytest.mark.parametrize(
    ("group", "option"), [(g, o) for g in ("callbacks", "logger") for o in _options(g)]
)
def test_every_callbacks_and_logger_option_instantiates(group, option, tmp_path):
    """The run's callbacks and logger come from these groups: each builds what train() uses,
    with its paths under the run folder."""
    import lightning as L

    from nfcv.training.run import run_callbacks

    cfg = nfcv.compose([f"{group}={option}", f"run_dir={tmp_path}"])
    if group == "callbacks":
        built = run_callbacks(cfg)
        assert len(built) == sum(v is not None for v in cfg.callbacks.values()) > 0
        assert all(isinstance(c, L.Callback) for c in built)
        dirs = {str(getattr(c, "dirpath", tmp_path)) for c in built}
        assert dirs == {str(tmp_path), str(tmp_path / "checkpoints")}, dirs
    else:
        logger = instantiate(cfg.logger)
        assert isinstance(logger, L.pytorch.loggers.Logger)
        assert str(logger.save_dir) == str(tmp_path)


@pytest.mark.parametrize("option", _options("hydra/launcher"))
def test_every_launcher_composes_and_instantiates(option):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("nfcv.configs", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)  # ${hydra.sweep...}
    launcher = instantiate(launcher_cfg)
    assert "submitit" in type(launcher).__module__


def test_the_tree_has_the_documented_groups():
    assert {"model", "data", "dequant", "optim", "trainer", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize(
    "group, option",
    [(g, o) for g in INSTANTIATED for o in _options(g)],
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
    import torch

    # The ImageNet and CelebA setups (up to 175M parameters) on the meta device: no memory
    # (tests/test_experiments.py counts their parameters); the rest for real.
    large = cfg.data.name.startswith(("imagenet", "celeba"))
    with torch.device("meta" if large else "cpu"):
        model = nfcv.build_model(cfg)
    assert model.image_shape == tuple(cfg.data.image_shape)


def test_configs_ship_inside_the_package():
    import importlib.resources

    root = importlib.resources.files("nfcv.configs")
    assert root.joinpath("train.yaml").is_file()
    assert root.joinpath("model").joinpath("glow.yaml").is_file()


def test_sample_and_eval_configs_compose():
    for name in ("sample", "eval", "export"):
        cfg = nfcv.compose(["ckpt=x.ckpt"], config_name=name)
        assert cfg.ckpt == "x.ckpt"


def test_nfcv_train_help_is_nfcvs_own_and_lists_the_groups_a_user_picks():
    """`nfcv-train --help` is nfcv's usage with each group's options read from the packaged
    configs (every file of the group), not Hydra's page with the internal schema/ groups."""
    import importlib.resources

    from nfcv.cli.train import USER_GROUPS, help_text

    text = help_text()
    assert text.startswith("nfcv-train:") and "powered by Hydra" not in text
    assert "schema" not in text and "--hydra-help" in text
    root = importlib.resources.files("nfcv.configs")
    for group, _ in USER_GROUPS:
        assert f"  {group} " in text
        for f in root.joinpath(*group.split("/")).iterdir():
            if f.name.endswith(".yaml"):
                assert f.name[:-5] in text, (group, f.name)
    assert all(len(line) <= 99 for line in text.splitlines())


def test_the_run_says_what_it_built_and_where_the_papers_setup_is():
    import lightning as L

    from nfcv.config import resolve
    from nfcv.training.run import paper_setup, what_was_built

    cpu_sized = resolve(nfcv.compose(["data=cifar10"]))
    assert paper_setup(cpu_sized) == "glow_cifar10"
    assert paper_setup(resolve(nfcv.compose(["experiment=glow_cifar10"]))) is None
    assert paper_setup(resolve(nfcv.compose([]))) is None  # no experiment for the digits
    cfg = resolve(nfcv.compose(["model.hidden=8", "model.steps=1"]))
    model = nfcv.build_model(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    line = what_was_built(cfg, model, trainer)
    params = sum(p.numel() for p in model.parameters())
    assert line.startswith("nfcv: glow (levels=2, steps=1, hidden=8) on digits 1x8x8: ")
    assert f"{params:,} parameters; cpu, precision 32-true" in line
    assert "paper" not in line
