"""The flow's own linear maps are exact under TF32, and ``compile=true`` compiles the whole
training forward (issue 18).

cuDNN runs float32 convolutions in TF32 unless told otherwise; a bijection whose linear maps are
rounded to 10 mantissa bits no longer matches its inverse. `nfcv.flows.exact` runs those maps
(the 1x1, block, emerging and periodic convolutions, the dense linear flow) with every backend
set to IEEE float32. These tests turn TF32 on everywhere and record the settings each
convolution and matrix product runs under, forward and backward.
"""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode

import nfcv
from nfcv.flows import exact
from nfcv.training.module import FlowModule

aten = torch.ops.aten
LINEAR_OPS = {
    aten.convolution.default,
    aten.convolution_backward.default,
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
}


class Outside(TorchDispatchMode):
    """Records the float32 convolutions and matrix products that run outside nfcv's exact
    operators (whose own aten calls happen below this mode), and the nfcv operators called."""

    def __init__(self):
        super().__init__()
        self.float32: list[str] = []
        self.exact_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "nfcv":
            self.exact_ops.append(str(func))
        elif func in LINEAR_OPS and any(
            isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.complex64)
            for a in args
        ):
            self.float32.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture
def tf32_everywhere():
    saved = exact.precision_settings()
    for _, backend in exact._SETTINGS:
        backend.fp32_precision = "tf32"
    yield
    for name, backend in exact._SETTINGS:
        backend.fp32_precision = saved[name]


@pytest.fixture
def settings_seen(monkeypatch):
    """The precision settings each of exact's implementations ran under."""
    seen: list[dict[str, str]] = []
    for name in ("_conv2d", "_conv2d_grads", "_matmul"):
        real = getattr(exact, name)

        def recording(*args, _real=real, **kwargs):
            seen.append(exact.precision_settings())
            return _real(*args, **kwargs)

        monkeypatch.setattr(exact, name, recording)
    return seen


# The flow's own linear maps (catalogue layers), on (C, H, W) = (4, 4, 4).
GLOW = ["model=glow", "model.hidden=4", "model.steps=1"]

LINEAR_LAYERS = ["invconv", "invconv_lu", "triangular", "block_diag", "emerging_conv"]
LINEAR_LAYERS += ["periodic_conv", "full_linear"]


@pytest.mark.parametrize("name", LINEAR_LAYERS)
def test_linear_maps_compute_in_ieee_float32_under_tf32(name, tf32_everywhere, settings_seen):
    """Forward, backward and inverse of each linear flow with TF32 on in every backend: every
    float32 convolution and product runs inside nfcv's exact operators, under IEEE settings,
    and the settings are the process's again afterwards."""
    layer = nfcv.build_layer(name, (4, 4, 4))
    x = torch.randn(3, 4, 4, 4, requires_grad=True)
    with Outside() as outside:
        z, logdet = layer(x)
        (z.square().sum() - logdet.sum()).backward()
        with torch.no_grad():
            x_back, _ = layer.inverse(z)
    assert not outside.float32, (
        f"float32 linear algebra outside nfcv.flows.exact: {outside.float32}"
    )
    assert outside.exact_ops and settings_seen
    assert all(set(s.values()) == {"ieee"} for s in settings_seen), settings_seen
    assert set(exact.precision_settings().values()) == {"tf32"}  # restored
    torch.testing.assert_close(x_back, x.detach(), rtol=1e-4, atol=1e-5)


def test_the_networks_keep_the_process_settings(tf32_everywhere, settings_seen):
    """A Glow training step: the coupling networks' convolutions run under the user's TF32
    settings (only the bijection's own maps are switched)."""
    model = nfcv.build_model(nfcv.compose(["data=digits", *GLOW])).train()
    x = torch.randint(0, 17, (4, 1, 8, 8))
    with Outside() as outside:
        model.bits_per_dim(x).mean().backward()
    assert outside.float32 and outside.exact_ops  # networks outside, 1x1 convs inside
    assert all(set(s.values()) == {"ieee"} for s in settings_seen)


def test_full_precision_restores_the_settings_after_an_error(tf32_everywhere):
    with pytest.raises(RuntimeError, match="boom"), exact.full_precision():
        assert set(exact.precision_settings().values()) == {"ieee"}
        raise RuntimeError("boom")
    assert set(exact.precision_settings().values()) == {"tf32"}


@pytest.mark.parametrize("groups,padding,kernel", [(1, 0, 1), (2, 0, 1), (1, 1, 3), (1, 0, 2)])
def test_exact_ops_have_the_gradients_of_the_plain_ops(groups, padding, kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.randn(4, 4 // groups, kernel, kernel, dtype=torch.float64, generator=gen)
    w.requires_grad_(True)
    for op in (exact.conv2d, exact._conv2d_op):  # plain on this CPU, and the custom operator
        assert torch.autograd.gradcheck(lambda a, b, op=op: op(a, b, padding, groups), (x, w))
    torch.testing.assert_close(
        exact.conv2d(x, w, padding, groups),
        torch.nn.functional.conv2d(x, w, padding=padding, groups=groups),
    )
    a = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(exact.matmul, (a, b))
    assert torch.autograd.gradcheck(exact._matmul_op, (a, b))
    args = (x.detach().float(), w.detach().float(), padding, groups)
    torch.library.opcheck(exact._conv2d_op, args)
    channels_last = args[0].contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(
        exact._conv2d_op, (channels_last, args[1].requires_grad_(True), *args[2:])
    )


def _module(*overrides: str) -> FlowModule:
    cfg = nfcv.compose(["data=digits", *GLOW, "compile=true", *overrides])
    module = FlowModule(OmegaConf.to_container(cfg, resolve=True))
    labels = torch.randint(0, 10, (4,)) if module.model.num_classes else None
    module.model.train().bits_per_dim(torch.randint(0, 17, (4, 1, 8, 8)), labels=labels)
    return module


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.coupling=spline", "model.permutation=emerging"],
        ["model.conditional=true", "model.num_classes=10"],
    ],
    ids=["glow", "glow_spline_emerging", "glow_conditional"],
)
def test_compile_takes_the_whole_training_forward_in_one_graph(overrides):
    """`compile=true` compiles dequantization, flow, prior and bits per dim together:
    `torch._dynamo.explain` finds one graph and no break (the custom ops of
    `nfcv.flows.exact` are single nodes)."""
    module = _module(*overrides)
    x = torch.randint(0, 17, (4, 1, 8, 8))
    labels = torch.randint(0, 10, (4,)) if module.model.num_classes else None
    explained = torch._dynamo.explain(module._train_bpd)(x, labels)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_a_compiled_training_step_equals_the_eager_one():
    """The compiled forward and backward (AOTAutograd, without code generation) give the eager
    loss and gradients."""
    module = _module()
    x = torch.randint(0, 17, (4, 1, 8, 8))

    def loss_and_grads(fn):
        module.zero_grad()
        torch.manual_seed(1)  # the same dequantization noise
        loss = fn(x, None)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in module.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads(module._train_bpd)
    compiled_loss, compiled_grads = loss_and_grads(
        torch.compile(module._train_bpd, backend="aot_eager")
    )
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert len(compiled_grads) == len(eager_grads) > 0
    for a, b in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
