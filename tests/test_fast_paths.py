"""The speed-ups of issue 9 compute what the plain code computes: each fast path against the
straightforward one, in float64, values and gradients."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from nfcv.flows.nets import GlowNet, ZeroConv2d


def _perturb(module: nn.Module, scale: float = 0.1) -> None:
    """Move every parameter off its initial value (zero-init layers would hide errors)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _values_and_grads(module: nn.Module, fn, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    gen = torch.Generator().manual_seed(2)
    weights = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), [x, *module.parameters()])
    return out.detach(), grads


def test_glow_net_folds_actnorm_into_its_convs():
    """GlowNet.forward (actnorm folded into the conv weights, in-place ReLU, the output scale
    folded into the last conv) equals running its layers one after the other, values and
    gradients."""
    torch.manual_seed(0)
    net = GlowNet(4, 6, hidden_channels=16).double().train()
    x = torch.randn(3, 4, 5, 7, dtype=torch.float64)
    first = net(x)  # the data-dependent init of both actnorms
    assert all(bool(m.norm.initialized) for m in (net.net[1], net.net[3]))
    assert torch.allclose(first, net.net(x), atol=1e-12)
    _perturb(net)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        fast, fast_grads = _values_and_grads(net, net, x)
        plain, plain_grads = _values_and_grads(net, net.net, x)
        assert fast.abs().max() > 0.1  # not the zero-init output
        assert fast.is_contiguous()  # NCHW outside
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
        for a, b in zip(fast_grads, plain_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_1x1_convolution_as_a_product_equals_the_convolution():
    import torch.nn.functional as F

    from nfcv.flows.conv1x1 import _mix_channels

    w = torch.randn(5, 5, dtype=torch.float64)
    for x in (
        torch.randn(3, 5, 4, 6, dtype=torch.float64),
        torch.randn(3, 5, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last),
    ):
        torch.testing.assert_close(
            _mix_channels(w, x), F.conv2d(x, w[:, :, None, None]), rtol=1e-13, atol=1e-13
        )


def test_zero_conv_folds_its_output_scale():
    conv = ZeroConv2d(5, 4).double()
    _perturb(conv)
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)

    def plain(v):
        return conv.conv(v) * torch.exp(conv.logs * 3.0)

    fast, fast_grads = _values_and_grads(conv, conv, x)
    ref, ref_grads = _values_and_grads(conv, plain, x)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nice_coupling_on_strided_halves_equals_the_indexed_one():
    from nfcv.flows.nets import MLP
    from nfcv.flows.presets import VectorAdditiveCoupling

    for parity in (0, 1):
        layer = VectorAdditiveCoupling(10, lambda i, o: MLP(i, o, hidden=8, num_layers=2), parity)
        layer = layer.double()
        _perturb(layer)
        x = torch.randn(4, 10, dtype=torch.float64)
        for sign in (1.0, -1.0):
            fast, fast_grads = _values_and_grads(layer, partial(layer._couple, sign=sign), x)
            ref, ref_grads = _values_and_grads(layer, partial(layer._couple_indexed, sign=sign), x)
            assert not torch.equal(fast, x)
            torch.testing.assert_close(fast, ref, rtol=0, atol=0)
            for a, b in zip(fast_grads, ref_grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_checkpointed_glow_trains_from_its_first_batch():
    """A fresh Glow with gradient checkpointing: its first step initialises the networks'
    actnorms, and the recomputation in backward must save what the first pass saved (a path
    that changed between the two would raise CheckpointError). Gradients equal those of the
    same fresh model without checkpointing."""
    import nfcv

    cfg = nfcv.compose(["model.hidden=8", "model.steps=2", "model.dropout=0"])
    x = torch.randint(0, 17, (6, 1, 8, 8))
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = nfcv.build_model(cfg).train()
        model.checkpoint_networks(checkpointed)
        model.bits_per_dim(x).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[1])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_logistic_to_normal_matches_its_two_tail_formulas():
    """LogisticToNormal computes each direction with one special function; the values equal
    the textbook two-tail formulas (log_ndtr(z) - log_ndtr(-z); logsigmoid(x) + logsigmoid(-x))
    across the range, tails included, in float64 and float32."""
    import torch.nn.functional as F

    from nfcv.flows.elementwise import HALF_LOG_2PI, LogisticToNormal

    layer = LogisticToNormal()
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        z = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
        z = z.to(dtype).view(1, -1)
        x, logdet = layer.inverse(z)
        x_ref = torch.special.log_ndtr(z) - torch.special.log_ndtr(-z)
        ll = F.logsigmoid(x_ref) + F.logsigmoid(-x_ref)
        ld_ref = -(ll - (-0.5 * z * z - HALF_LOG_2PI)).sum(1)
        torch.testing.assert_close(x, x_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(logdet, ld_ref, rtol=tol, atol=tol * z.numel())
        eps, logdet_f = layer(x)
        ll_f = F.logsigmoid(x) + F.logsigmoid(-x)
        ld_f = (ll_f - (-0.5 * eps * eps - HALF_LOG_2PI)).sum(1)
        torch.testing.assert_close(logdet_f, ld_f, rtol=tol, atol=tol * z.numel())
        inner = z.abs() < (8 if dtype == torch.float64 else 5)  # where x still resolves z
        torch.testing.assert_close(eps[inner], z[inner], rtol=1e-6, atol=1e-6)


def test_optimizer_is_fused_where_it_can_be():
    """Adam from the config is the fused implementation (one kernel per step) unless the config
    says `fused: false` or mixed precision is on; Adamax has none. The fused step is the same
    update up to rounding."""
    import nfcv
    from nfcv.training.module import build_optimizer

    def params():
        torch.manual_seed(0)
        p = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
        for q in p:
            q.grad = torch.randn_like(q)
        return p

    adam = nfcv.compose([]).optim.optimizer
    fused = build_optimizer(adam, p_fused := params())
    assert fused.defaults["fused"] is True
    plain = build_optimizer(adam, p_plain := params(), allow_fused=False)
    assert not plain.defaults["fused"]
    for _ in range(3):
        fused.step()
        plain.step()
    for a, b, start in zip(p_fused, p_plain, params(), strict=True):
        assert not torch.equal(a, start)  # the steps moved it
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    off = nfcv.compose(["+optim.optimizer.fused=false"]).optim.optimizer
    assert not build_optimizer(off, params()).defaults["fused"]
    adamax = nfcv.compose(["optim=adamax"]).optim.optimizer
    assert "fused" not in build_optimizer(adamax, params()).defaults
