"""Mixed precision: under bfloat16 autocast the flow's main path, log-dets and loss stay in
float32, so bits per dim moves by far less than 0.01 from float32 on the same weights."""

from __future__ import annotations

import pytest
import torch
from test_presets import VARIATIONAL, _model

import nfcv


@pytest.mark.parametrize("name", ["nice", "realnvp", "glow", "flowpp"])
def test_bf16_autocast_bpd_within_a_hundredth_of_float32(name):
    model = _model(name, *VARIATIONAL)
    x = torch.randint(0, 17, (64, 1, 8, 8))
    with torch.no_grad():
        torch.manual_seed(0)
        full = model.bits_per_dim(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            mixed = model.bits_per_dim(x)
            eps, logdet = model.transform(torch.rand(4, 1, 8, 8))
    assert mixed.dtype == torch.float32 and logdet.dtype == torch.float32
    assert eps.dtype == torch.float32
    assert abs(mixed.mean().item() - full.mean().item()) < 0.01
    assert (mixed - full).abs().max().item() < 0.02


def test_bf16_mixed_trainer_runs_and_checkpoints(tmp_path, tiny):
    from nfcv.training.run import train

    cfg = nfcv.compose([*tiny(), "trainer.precision=bf16-mixed"])
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 4 and 0 < summary["test_bpd"] < 10
    model = nfcv.load(summary["best_ckpt"])
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", ["realnvp", "glow", "flowpp"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    model = _model(name, *VARIATIONAL)
    model.train()
    for m in model.modules():  # no dropout or batch-norm updates: compare like with like
        if isinstance(m, (torch.nn.Dropout, torch.nn.BatchNorm2d)):
            m.eval()
    x = torch.randint(0, 17, (8, 1, 8, 8))

    def grads(flag: bool) -> dict[str, torch.Tensor]:
        assert model.checkpoint_networks(flag) > 0
        model.zero_grad()
        torch.manual_seed(0)
        model.bits_per_dim(x).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6)


def test_checkpoint_grads_and_compile_flags_reach_the_model():
    cfg = nfcv.compose(["model=flowpp", "model.checkpoint_grads=true", "compile=true"])
    model = nfcv.build_model(cfg)
    couplings = [m for m in model.modules() if hasattr(m, "checkpoint_grads")]
    assert couplings and all(m.checkpoint_grads for m in couplings)
    from omegaconf import OmegaConf

    from nfcv.training.module import FlowModule

    module = FlowModule(OmegaConf.to_container(cfg, resolve=True))
    assert module._compiled_bpd is not None  # the whole training forward (tests/test_exact.py)
    # Names unchanged: a compiled model's checkpoint loads into an eager one.
    assert set(module.model.state_dict()) == set(model.state_dict())
