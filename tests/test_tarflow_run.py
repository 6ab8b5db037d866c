"""model=tarflow through the whole tool chain (slow: two tiny training runs): nfcv-train (EMA,
gradient checkpointing, a class-conditional run), nfcv-eval's breakdown, every nfcv-sample mode
and guidance's errors; and, fast, bf16 autocast, gradient checkpointing and guidance at 0 on the
model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import nfcv
from nfcv.errors import ConfigError
from nfcv.flows.tarflow import Guidance

TINY = [
    "model=tarflow",
    "model.width=16",
    "model.head_dim=8",
    "model.blocks=2",
    "model.layers=1",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "sample.every_n_steps=2",
    "sample.per_row=2",
    "data.batch_size=16",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An unconditional run (EMA, gradient checkpointing) and a class-conditional one."""
    from nfcv.training.run import train

    root = tmp_path_factory.mktemp("tarflow")
    plain = train(
        nfcv.compose([*TINY, "ema.decay=0.9", "model.checkpoint_grads=true"]),
        run_dir=root / "plain",
    )
    cond = train(nfcv.compose([*TINY, "model.conditional=true"]), run_dir=root / "cond")
    return {"plain": Path(plain["best_ckpt"]), "cond": Path(cond["best_ckpt"]), "root": root}


def _sample(*overrides: str):
    from nfcv.cli.sample import sample

    return sample(nfcv.compose(list(overrides), config_name="sample"))


@pytest.mark.slow
def test_runs_train_and_reload(runs):
    model = nfcv.load(runs["plain"])
    assert model.config.model.name == "tarflow" and model.num_classes is None
    assert all(b.checkpoint_grads for b in model.flow.blocks)
    cond = nfcv.load(runs["cond"])
    assert cond.num_classes == 10 and cond.labels_in_flow and cond.class_prior is None


@pytest.mark.slow
def test_eval_breakdown_adds_up(runs, tmp_path):
    from nfcv.cli.eval import evaluate

    for name in ("plain", "cond"):
        cfg = nfcv.compose(
            [f"ckpt={runs[name]}", f"out={tmp_path / name}.json", "progress=false"],
            config_name="eval",
        )
        record = evaluate(cfg)
        parts = sum(row["bpd"] for row in record["breakdown"])
        assert abs(parts - record["bpd"]) < 1e-6 and 0 < record["bpd"] < 10


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["grid", "interpolate", "reconstruct", "npz"])
def test_every_sample_mode(runs, tmp_path, mode):
    out = tmp_path / ("s.npz" if mode == "npz" else "s.png")
    for name in ("plain", "cond"):
        _sample(f"ckpt={runs[name]}", f"mode={mode}", "n=4", f"out={out}")
        assert out.exists()
    if mode == "npz":
        with np.load(out) as f:
            assert f["images"].shape == (4, 1, 8, 8)


@pytest.mark.slow
def test_guided_sampling_from_the_cli(runs, tmp_path):
    out = tmp_path / "g.png"
    _sample(f"ckpt={runs['cond']}", "guidance=2", "label=3", "guidance_anneal=true", f"out={out}")
    _sample(f"ckpt={runs['plain']}", "guidance=1", "attn_temp=1.5", "n=2", f"out={out}")
    _sample(f"ckpt={runs['plain']}", "mode=npz", "guidance=1", "attn_temp=0.5", "n=2",
            f"out={tmp_path / 'g.npz'}")  # fmt: skip
    with pytest.raises(ConfigError, match="unconditional.*attn_temp"):
        _sample(f"ckpt={runs['plain']}", "guidance=1", f"out={out}")
    with pytest.raises(ConfigError, match="guides sampling"):
        _sample(f"ckpt={runs['cond']}", "guidance=1", "mode=reconstruct", f"out={out}")
    with pytest.raises(ConfigError, match="guidance must be a number"):
        _sample(f"ckpt={runs['cond']}", "guidance=-1", f"out={out}")


def test_guidance_on_another_model_is_a_config_error(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="needs a TarFlow checkpoint"):
        _sample(f"ckpt={tiny_run['best_ckpt']}", "guidance=1", f"out={tmp_path / 'x.png'}")


def test_guidance_zero_equals_plain_sampling_for_the_model():
    model = _model("model.conditional=true", "model.num_classes=10").double().eval()
    gen = torch.Generator().manual_seed(0)
    plain = model.sample(3, label=2, generator=gen)
    gen = torch.Generator().manual_seed(0)
    zero = model.sample(3, label=2, generator=gen, guidance=Guidance(0.0))
    torch.testing.assert_close(zero, plain, atol=1e-12, rtol=0)


def _model(*extra):
    torch.manual_seed(0)
    cfg = nfcv.compose([*TINY[:5], *extra])
    model = nfcv.build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_bf16_autocast_keeps_the_main_path_in_float32():
    model = _model().eval()
    x = torch.randint(0, 17, (64, 1, 8, 8))
    with torch.no_grad():
        torch.manual_seed(0)
        full = model.bits_per_dim(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            mixed = model.bits_per_dim(x)
            eps, logdet = model.transform(torch.rand(4, 1, 8, 8))
    assert mixed.dtype == logdet.dtype == eps.dtype == torch.float32
    assert abs(mixed.mean().item() - full.mean().item()) < 0.01


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _model("model.conditional=true", "model.num_classes=10", "model.label_dropout=0")
    model.train()
    x, y = torch.randint(0, 17, (8, 1, 8, 8)), torch.arange(8)

    def grads(flag):
        assert model.checkpoint_networks(flag) == 2
        model.zero_grad()
        torch.manual_seed(0)
        model.bits_per_dim(x, labels=y).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6)
