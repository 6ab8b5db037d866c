"""Dequantization: integer images -> points of [0, 1]^D, with log q(u | x).

Uniform dequantization (Theis et al. 2016, arXiv:1511.01844) adds u ~ U[0, 1)^D, so log q = 0 and
the continuous likelihood lower-bounds the discrete one. Variational dequantization (Flow++,
arXiv:1902.00275) learns q(u | x) with a conditional flow, which tightens that bound. Gaussian
noise augmentation (TarFlow, arXiv:2412.06329) is no dequantization in that sense: its figure is
the continuous density of the noised images, not a bound on the discrete likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.base import Bijector
from nfcv.flows.conv1x1 import BlockInvConv1x1
from nfcv.flows.elementwise import Sigmoid
from nfcv.flows.multiscale import ColumnSplit, SwapHalves
from nfcv.flows.nets import GatedConv

LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(eps: Tensor) -> Tensor:
    """log N(eps; 0, I) summed per sample, eps of shape (B, D)."""
    eps = eps if eps.dtype in (torch.float32, torch.float64) else eps.float()
    return -0.5 * (eps.pow(2).sum(dim=1) + eps.shape[1] * LOG_2PI)


class Dequantizer(nn.Module):
    """``forward(x, num_bins) -> (y, log_q)`` with ``y = (x + u) / num_bins``; `x` holds the
    integer pixel values as floats of the model's dtype.

    `discrete_bound`: whether ``log p(y) - log q(u|x) - D log(num_bins)`` lower-bounds the log
    probability of the integer image (then bits per dim is a discrete bound). `bounded`: whether
    every y lies in [0, 1]^D (a logit preprocessing needs that)."""

    discrete_bound: bool = True
    bounded: bool = True

    def figure(self) -> str:
        """What a bits-per-dim figure computed with this noise is, in words."""
        return "bits per dim (an upper bound on the discrete -log2 P(x) / D)"

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class UniformDequantization(Dequantizer):
    """``u ~ U[0, 1)^D``, ``log q(u | x) = 0``."""

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
        u = torch.rand_like(x)
        return (x + u) / num_bins, x.new_zeros(x.shape[0])


class VariationalDequantization(Dequantizer):
    """Flow++'s variational dequantization (Ho et al. 2019, arXiv:1902.00275, section 3.1):
    ``u = q_x(eps)``, ``eps ~ N(0, I)``, with q_x a flow conditioned on the image x, ending in a
    sigmoid so that u lies in (0, 1)^D; ``log q(u | x) = log N(eps) - log|det du/deps|``.

    Built from the model's own blocks, as in the paper's code: the noise is split into even and
    odd columns (`ColumnSplit`); `num_steps` steps of per-position ActNorm, a 1x1 convolution per
    half, a coupling whose network also sees a context map of x, and a swap of the halves; the
    columns merged; the sigmoid. The context network reads ``x / num_bins - 0.5`` split the same
    way: a 3x3 conv to `context_channels`, then `context_blocks` gated residual convs.

    Trained jointly with the flow: the loss (bits per dim) includes ``-log q``, so the bound
    ``E_q[log p(x + u) - log q(u|x)] <= log P(x)`` tightens as q learns.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        coupling: Callable[..., Bijector],
        num_steps: int = 4,
        context_channels: int = 32,
        context_blocks: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        c, h, w = (int(s) for s in image_shape)
        if w % 2:
            raise ValueError(
                f"variational dequantization splits columns in two: the image width must be "
                f"even, got shape {(c, h, w)}"
            )
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.image_shape = (c, h, w)
        self.split = ColumnSplit()
        self.context_in = nn.Conv2d(2 * c, context_channels, 3, padding=1)
        self.context_blocks = nn.ModuleList(
            GatedConv(context_channels, dropout=dropout, nin=False) for _ in range(context_blocks)
        )
        half = (h, w // 2)
        self.steps = nn.ModuleList()
        for _ in range(num_steps):
            self.steps.extend(
                [
                    ActNorm(2 * c, spatial=half),
                    BlockInvConv1x1(2 * c, groups=2),
                    coupling(2 * c, mask="channel", net_kwargs={"spatial": half}),
                    SwapHalves(),
                ]
            )
        for layer in self.steps:
            layer.output_shape((2 * c, *half))
        self.sigmoid = Sigmoid()

    def context(self, x: Tensor, num_bins: int) -> Tensor:
        h = self.context_in(self.split(x / num_bins - 0.5)[0])
        for block in self.context_blocks:
            h = block(h)
        return h

    def noise_to_u(self, eps: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        """``(u, log|det du/deps|)`` for noise `eps` of the image shape and a `context` map."""
        v, total = self.split(eps)
        for layer in self.steps:
            v, logdet = layer(v, context)
            total = total + logdet
        v, _ = self.split.inverse(v)
        u, logdet = self.sigmoid(v)
        return u, total + logdet

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
        eps = torch.randn_like(x)
        u, logdet = self.noise_to_u(eps, self.context(x, num_bins))
        log_q = standard_normal_log_prob(eps.reshape(x.shape[0], -1)) - logdet
        return (x + u) / num_bins, log_q


class GaussianDequantization(Dequantizer):
    """TarFlow's noise augmentation (Zhai et al. 2024, arXiv:2412.06329; apple/ml-tarflow,
    `train.py`, ``--noise_type=gaussian``): Gaussian noise in place of uniform dequantization,

        y = (x + 1/2) / num_bins + noise_std * n,     n ~ N(0, I),

    the bin centres of the integer image plus noise. `noise_std` is in the units of y, the
    model's [0, 1] input (TarFlow's data are in [-1, 1], so its ``--noise_std=0.05`` is 0.025
    here). y leaves [0, 1] with positive probability (`bounded` is False).

    The model then learns the continuous density of the noised images, and bits per dim is
    ``-log2 p(y) / D``: no ``log q`` and no ``D log(num_bins)`` term (`LogWeightParts.discrete`
    is 0), and it bounds nothing discrete (Gaussian noise spills out of the bins). `log_q` is
    returned as zeros: no dequantization density enters the figure. Denoising a sample with
    Tweedie's formula, ``y + noise_std^2 grad log p(y)`` (`ImageFlow.denoise`), estimates the
    clean image the noise was added to.
    """

    discrete_bound = False
    bounded = False

    def __init__(self, noise_std: float = 0.05):
        super().__init__()
        try:
            std = float(noise_std)
        except (TypeError, ValueError):
            std = math.nan
        if not (math.isfinite(std) and std > 0):
            raise ValueError(
                f"dequant.noise_std must be a finite number > 0 (the standard deviation of the "
                f"Gaussian noise in [0, 1] image units, e.g. 0.05), got {noise_std!r}"
            )
        self.noise_std = std

    def figure(self) -> str:
        return (
            f"continuous bits per dim of x + N(0, {self.noise_std:g}^2), x in [0, 1] (the "
            "density of the noised images, not a discrete bits-per-dim bound)"
        )

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
        noise = torch.randn_like(x)
        return (x + 0.5) / num_bins + self.noise_std * noise, x.new_zeros(x.shape[0])
