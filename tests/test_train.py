"""Training with the real Lightning Trainer on the embedded digits; checkpoints and reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nfcv
import nfcv.data
from nfcv.training.module import FlowModule


def test_a_few_steps_lower_the_loss(tmp_path):
    import lightning as L

    cfg = nfcv.compose(["model.hidden=16", "model.steps=2", "optim.warmup_steps=5"])
    L.seed_everything(0, verbose=False)
    dm = nfcv.data.DigitsDataModule(
        image_shape=[1, 8, 8], num_bins=17, batch_size=64, val_size=150
    )
    from omegaconf import OmegaConf

    module = FlowModule(OmegaConf.to_container(cfg, resolve=True))
    x = dm.split("val").images[:128]

    def val_bpd() -> float:
        module.model.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            return module.model.bits_per_dim(x).mean().item()

    module.model.train()
    module.model.bits_per_dim(dm.split("train").images[:64])  # ActNorm init, as in training
    before = val_bpd()
    module.model.train()
    trainer = L.Trainer(
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        accelerator="cpu",
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    after = val_bpd()
    assert after < before - 0.3, (before, after)


def test_checkpoint_reload_gives_identical_log_prob(tiny_run):
    summary = tiny_run
    run_dir = Path(summary["run_dir"])
    best = summary["best_ckpt"]
    assert best.endswith(".ckpt") and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert summary["steps"] == 4
    loaded = nfcv.load(best)
    assert not loaded.training
    assert all(bool(m.initialized) for m in loaded.modules() if hasattr(m, "initialized"))
    module = summary["module"].model.eval()
    x = torch.rand(8, 1, 8, 8)
    torch.testing.assert_close(loaded.log_prob(x), module.log_prob(x), atol=0, rtol=0)
    assert loaded.config.model.name == "glow"
    assert (run_dir / "samples.png").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))


def test_checkpoint_holds_only_plain_containers(tiny_run):
    ckpt = torch.load(tiny_run["last_ckpt"], map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert type(hp["cfg"]) is dict and type(hp["cfg"]["model"]) is dict
    assert hp["cfg"]["model"]["flow"]["num_levels"] == 2  # resolved, not "${model.levels}"
    assert hp["data_info"]["split_sizes"] == {"train": 1350, "val": 150, "test": 297}


def test_lr_schedule_warmup_then_cosine():
    from nfcv.training.module import lr_factor

    f = lr_factor(10, "cosine", 110)
    assert f(0) == 0.1 and f(9) == 1.0 and f(10) == 1.0
    assert abs(f(60) - 0.5) < 1e-12 and abs(f(110)) < 1e-12
    assert lr_factor(10)(500) == 1.0  # no decay: constant after warmup


def test_unknown_choice_is_a_config_error():
    from nfcv.errors import ConfigError

    with pytest.raises(ConfigError, match="splines"):
        nfcv.build_model(nfcv.compose(["model.coupling=splines"]))


@pytest.mark.parametrize(
    "choice",
    [
        ["model.coupling=spline"],
        ["model.coupling=mixlogcdf"],
        ["model.permutation=periodic"],
        ["model=maf"],
        ["model=maf", "model.autoregressive=iaf", "model.norm=diag_affine"],
        ["model=hint"],
        # Loose solver tolerances and the Hutchinson trace everywhere keep this to seconds.
        [
            "model=ffjord",
            "model.choices.cnf.rtol=1e-3",
            "model.choices.cnf.atol=1e-3",
            "model.choices.cnf.exact_max_dim=0",
        ],
    ],
    ids=lambda c: " ".join(c)[:40],
)
def test_other_layer_choices_train_on_digits(tmp_path, tiny, choice):
    from nfcv.training.run import train

    summary = train(nfcv.compose([*tiny(), *choice]), run_dir=tmp_path / "run")
    assert summary["steps"] == 4
    assert 0 < summary["test_bpd"] < 6
    loaded = nfcv.load(summary["best_ckpt"])
    x = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(loaded.inverse(loaded.transform(x)[0]), x, atol=1e-4, rtol=0)
