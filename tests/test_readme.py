"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import nfcv

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.fixture
def registry(monkeypatch):
    from nfcv import registry

    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    return registry


def test_the_own_layer_example_registers_a_layer_that_trains_in_a_model(registry):
    (block,) = [b for b in _blocks() if "@nfcv.register" in b]
    namespace: dict = {"__name__": "mypkg.layers"}
    exec(compile(block, "README.md", "exec"), namespace)
    cls = namespace["ChannelScale"]
    assert registry.lookup("mypkg.layers.ChannelScale") is cls
    cfg = nfcv.compose(["model.hidden=8", "model.steps=1"])
    step = list(cfg.model.flow.step)
    cfg.model.flow.step = [{"_target_": "mypkg.layers.ChannelScale", "_partial_": True}, *step]
    model = nfcv.build_model(cfg)
    assert any(isinstance(m, cls) for m in model.modules())
    x = torch.randint(0, 17, (4, 1, 8, 8)).float()
    bpd = model.bits_per_dim(x)
    assert torch.isfinite(bpd).all()
    bpd.mean().backward()
    layer = next(m for m in model.modules() if isinstance(m, cls))
    assert layer.log_scale.grad is not None
    z = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    layer = cls(4).double()
    torch.nn.init.normal_(layer.log_scale)
    y, logdet = layer(z)
    back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(back, z)
    torch.testing.assert_close(inv_logdet, -logdet)
