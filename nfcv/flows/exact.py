"""The flow's own linear maps in full float32, whatever the process's TF32 settings.

On NVIDIA GPUs since Ampere, cuDNN runs float32 convolutions in TF32 by default (10 mantissa
bits), and many users turn TF32 on for matrix products too (``torch.set_float32_matmul_precision
("high")``, which Lightning suggests). That is fine for the coupling networks, whose outputs only
parameterise a transform, but not for the main path of the bijection: a 1x1 convolution whose
forward and inverse are rounded to TF32 no longer undo each other (emulating TF32 in the 1x1
convolutions of a trained digits Glow took its reconstruction error from 6e-7 to 2e-3), and the
density is then that of a different map than the one inverted for sampling.

`conv2d` and `matmul` here run their forward and backward with cuDNN, cuBLAS and oneDNN set to
IEEE float32 (`full_precision`), and restore the settings after. They are `torch.library`
custom operators, so ``torch.compile`` treats each as one opaque node instead of breaking its
graph at the settings switch; on a CPU whose oneDNN computes in IEEE anyway (its default) the
plain operation runs instead, without the operator's dispatch cost. Float64 inputs (the tests'
brute-force checks) pass through as they are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# (backend module, attribute): the float32 precision settings of every backend that can round
# float32 convolutions or products (PyTorch >= 2.9's per-backend API).
_SETTINGS = (
    ("cudnn.conv", torch.backends.cudnn.conv),
    ("cuda.matmul", torch.backends.cuda.matmul),
    ("mkldnn.conv", torch.backends.mkldnn.conv),
    ("mkldnn.matmul", torch.backends.mkldnn.matmul),
)


_MKLDNN_CONV, _MKLDNN_MATMUL = torch.backends.mkldnn.conv, torch.backends.mkldnn.matmul


def precision_settings() -> dict[str, str]:
    """The float32 precision each backend uses now (``"ieee"``, ``"tf32"``, ``"bf16"`` or
    ``"none"``: the backend's default)."""
    return {name: backend.fp32_precision for name, backend in _SETTINGS}


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Convolutions and matrix products in IEEE float32 inside, the previous settings after."""
    saved = precision_settings()
    try:
        for _, backend in _SETTINGS:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for name, backend in _SETTINGS:
            backend.fp32_precision = saved[name]


def _conv2d(x: Tensor, weight: Tensor, padding: int, groups: int) -> Tensor:
    if x.device.type == "cpu" and groups == 1 and weight.shape[2:] == (1, 1) and padding == 0:
        # A 1x1 convolution as one product over the batch's pixels: on a CPU oneDNN's 1x1
        # convolution of a few channels took 2-3x as long, forward and backward. The result is
        # a view in (C, N, H, W) memory order; the layers after it take any strides.
        return torch.einsum("oc,nchw->nohw", weight[:, :, 0, 0], x)
    return F.conv2d(x, weight, padding=padding, groups=groups)


def _rounds(device: torch.device) -> bool:
    """Whether float32 convolutions or products on `device` may run below IEEE precision now.
    On a CPU only if the user set oneDNN to TF32 or bf16; on a GPU always (cuDNN's default is
    TF32). Under torch.compile always (the settings are not readable in a graph)."""
    if torch.compiler.is_compiling() or device.type != "cpu":
        return True
    ieee = ("none", "ieee")
    return not all(b.fp32_precision in ieee for b in (_MKLDNN_CONV, _MKLDNN_MATMUL))


def conv2d(x: Tensor, weight: Tensor, padding: int = 0, groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, padding=padding, groups=groups)`` in full float32: through the
    custom operator where the backend could round, directly where it computes in IEEE anyway
    (a CPU with oneDNN's default settings; the operator's dispatch costs ~50 us a call)."""
    if _rounds(x.device):
        return _conv2d_op(x, weight, padding, groups)
    return _conv2d(x, weight, padding, groups)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (a: (..., n, k), b: (k, m)) in full float32 (see `conv2d`)."""
    return _matmul_op(a, b) if _rounds(a.device) else _matmul(a, b)


@torch.library.custom_op("nfcv::conv2d_fp32", mutates_args=())
def _conv2d_op(x: Tensor, weight: Tensor, padding: int = 0, groups: int = 1) -> Tensor:
    """``F.conv2d(x, weight, padding=padding, groups=groups)`` with every backend in IEEE
    float32 (`full_precision`)."""
    with full_precision():
        return _conv2d(x, weight, padding, groups).contiguous()


@_conv2d_op.register_fake
def _(x, weight, padding=0, groups=1):
    return F.conv2d(x, weight, padding=padding, groups=groups).contiguous()


def _conv2d_grads(
    grad: Tensor, x: Tensor, weight: Tensor, padding: int, groups: int
) -> tuple[Tensor, Tensor]:
    if x.device.type == "cpu" and groups == 1 and weight.shape[2:] == (1, 1) and padding == 0:
        w = weight[:, :, 0, 0]
        gx = torch.einsum("oc,nohw->nchw", w, grad)
        gw = torch.einsum("nohw,nchw->oc", grad, x)[:, :, None, None]
    else:
        gx = F.conv_transpose2d(grad, weight, padding=padding, groups=groups)
        gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=padding, groups=groups)
    return gx, gw


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    return a @ b


@torch.library.custom_op("nfcv::conv2d_fp32_backward", mutates_args=())
def _conv2d_backward(
    grad: Tensor, x: Tensor, weight: Tensor, padding: int, groups: int
) -> tuple[Tensor, Tensor]:
    with full_precision():
        gx, gw = _conv2d_grads(grad, x, weight, padding, groups)
    return gx.contiguous(), gw.contiguous()


@_conv2d_backward.register_fake
def _(grad, x, weight, padding, groups):
    dense = torch.contiguous_format
    return torch.empty_like(x, memory_format=dense), torch.empty_like(weight, memory_format=dense)


def _conv2d_setup(ctx, inputs, output) -> None:
    x, weight, padding, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.padding, ctx.groups = padding, groups


def _conv2d_grad(ctx, grad):
    x, weight = ctx.saved_tensors
    gx, gw = _conv2d_backward(grad, x, weight, ctx.padding, ctx.groups)
    return gx, gw, None, None


_conv2d_op.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)


@torch.library.custom_op("nfcv::matmul_fp32", mutates_args=())
def _matmul_op(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with every backend in IEEE float32 (`full_precision`)."""
    with full_precision():
        return _matmul(a, b).contiguous()


@_matmul_op.register_fake
def _(a, b):
    return a @ b


def _matmul_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _matmul_grad(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = _matmul_op(grad, b.T.contiguous())
    grad_b = _matmul_op(
        a.reshape(-1, a.shape[-1]).T.contiguous(), grad.reshape(-1, grad.shape[-1])
    )
    return grad_a, grad_b


_matmul_op.register_autograd(_matmul_grad, setup_context=_matmul_setup)
