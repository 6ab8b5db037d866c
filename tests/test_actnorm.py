"""ActNorm's data-dependent initialisation (Glow, arXiv:1807.03039, section 3.1)."""

from __future__ import annotations

import torch

from nfcv.flows import ActNorm


def test_init_gives_zero_mean_unit_std_per_channel():
    layer = ActNorm(3).train()
    x = torch.randn(16, 3, 5, 5) * torch.tensor([0.1, 2.0, 7.0]).view(1, 3, 1, 1) + 4.0
    z, _ = layer(x)
    mean = z.mean(dim=(0, 2, 3))
    std = z.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-5, rtol=0)
    assert bool(layer.initialized)


def test_reloaded_layer_does_not_reinitialise():
    layer = ActNorm(2).train()
    layer(torch.randn(8, 2, 3, 3) * 5)
    fresh = ActNorm(2).train()
    fresh.load_state_dict(layer.state_dict())
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh(torch.randn(8, 2, 3, 3) + 100)  # different statistics: an init would change loc
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_only_the_first_training_batch_initialises():
    layer = ActNorm(2).train()
    layer(torch.randn(8, 2, 3, 3))
    loc = layer.loc.detach().clone()
    layer(torch.randn(8, 2, 3, 3) * 3 + 9)
    torch.testing.assert_close(layer.loc.detach(), loc)


def test_constant_channel_gives_finite_output():
    layer = ActNorm(2).train()
    x = torch.randn(4, 2, 3, 3)
    x[:, 1] = 0.25
    z, logdet = layer(x)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    assert torch.isfinite(layer.log_scale).all()
    torch.testing.assert_close(z[:, 1], torch.zeros_like(z[:, 1]))


def test_eval_first_call_is_identity_and_finite():
    """Lightning's sanity check runs validation, in eval mode, before the first training batch."""
    layer = ActNorm(2).eval()
    x = torch.randn(4, 2, 3, 3)
    z, logdet = layer(x)
    torch.testing.assert_close(z, x)
    assert torch.all(logdet == 0)
    assert not bool(layer.initialized)
    layer.train()
    layer(x * 3)
    assert bool(layer.initialized)
