"""Coupling layers over channel halves: additive (NICE, Dinh et al. 2014, arXiv:1410.8516),
affine (RealNVP, Dinh et al. 2016, arXiv:1605.08803; Glow's variant, arXiv:1807.03039),
rational-quadratic spline (Durkan et al. 2019, arXiv:1906.04032) and mixture-of-logistics CDF
(Flow++, Ho et al. 2019, arXiv:1902.00275)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels, sum_except_batch, zero_logdet
from nfcv.flows.splines import (
    mixture_logistic_logit,
    mixture_logistic_logit_inverse,
    rational_quadratic_spline,
)

NetFactory = Callable[[int, int], nn.Module]

# Glow bounds the scale as sigmoid(h + 2): in (0, 1), about 0.88 when the net outputs 0, so a
# coupling can only contract, which keeps deep stacks from blowing up (openai/glow, model.py).
SIGMOID_SCALE_SHIFT = 2.0


class _ChannelCoupling(Bijector):
    """Channels split into ``x1 = x[:, :c1]`` (conditioner) and ``x2 = x[:, c1:]`` (changed)."""

    def __init__(self, num_channels: int, net: NetFactory, params_per_channel: int):
        super().__init__()
        if num_channels < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 channels to split, got {num_channels}; "
                "squeeze the image first"
            )
        self.num_channels = num_channels
        self.c1 = num_channels // 2
        self.c2 = num_channels - self.c1
        self.net = net(self.c1, params_per_channel * self.c2)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)


class AdditiveCoupling(_ChannelCoupling):
    """``z2 = x2 + t(x1)``: volume-preserving, log-det 0 (NICE)."""

    def __init__(self, num_channels: int, net: NetFactory):
        super().__init__(num_channels, net, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        return torch.cat([x1, x2 + self.net(x1)], dim=1), zero_logdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        return torch.cat([z1, z2 - self.net(z1)], dim=1), zero_logdet(z)


class AffineCoupling(_ChannelCoupling):
    """Glow's affine coupling ``z2 = (x2 + t(x1)) * s(x1)`` with ``s = sigmoid(h + 2)``.

    The network's output channels interleave (shift, raw scale) as in openai/glow; log s is
    computed as logsigmoid so it stays finite for any network output.
    """

    def __init__(self, num_channels: int, net: NetFactory):
        super().__init__(num_channels, net, 2)

    def _shift_logscale(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x1)
        return h[:, 0::2], F.logsigmoid(h[:, 1::2] + SIGMOID_SCALE_SHIFT)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        shift, log_s = self._shift_logscale(x1)
        z2 = (x2 + shift) * torch.exp(log_s)
        return torch.cat([x1, z2], dim=1), sum_except_batch(log_s)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        shift, log_s = self._shift_logscale(z1)
        x2 = z2 * torch.exp(-log_s) - shift
        return torch.cat([z1, x2], dim=1), -sum_except_batch(log_s)


def _per_element(h: Tensor, c2: int) -> Tensor:
    """Network output (B, c2 * P, H, W) -> per-element parameters (B, c2, H, W, P)."""
    b, _, height, width = h.shape
    return h.view(b, c2, -1, height, width).permute(0, 1, 3, 4, 2)


class SplineCoupling(_ChannelCoupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019, arXiv:1906.04032).

    Each element of ``x2`` goes through its own monotone spline with `num_bins` bins on
    [-bound, bound] (identity outside), parameterised by the network from ``x1``; the network's
    zero-initialised last layer makes every spline the identity at the start.
    """

    def __init__(self, num_channels: int, net: NetFactory, num_bins: int = 8, bound: float = 3.0):
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        super().__init__(num_channels, net, 3 * num_bins - 1)
        self.num_bins = num_bins
        self.bound = float(bound)

    def _spline(self, cond: Tensor, x2: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        p = _per_element(self.net(cond), self.c2)
        k = self.num_bins
        y, logdet = rational_quadratic_spline(
            x2, p[..., :k], p[..., k : 2 * k], p[..., 2 * k :], self.bound, inverse=inverse
        )
        return y, sum_except_batch(logdet)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        z2, logdet = self._spline(x1, x2, inverse=False)
        return torch.cat([x1, z2], dim=1), logdet

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        x2, logdet = self._spline(z1, z2, inverse=True)
        return torch.cat([z1, x2], dim=1), logdet


# Flow++ keeps mixture log-scales above -7 (arXiv:1902.00275 code): narrower logistics make the
# CDF a near step whose inverse bisection cannot resolve.
MIN_LOG_SCALE = -7.0


class MixLogCDFCoupling(_ChannelCoupling):
    """Flow++'s coupling: ``z2 = logit(MixLogCDF(x2; pi, mu, s)) * exp(a) + b`` (arXiv:1902.00275,
    section 3.2), all parameters from the network on ``x1``; ``a = tanh(.)`` bounds the scale.

    The inverse solves the mixture CDF by bisection to `tol`. With zero network outputs every
    component is the standard logistic, whose CDF's logit is the identity.
    """

    def __init__(
        self, num_channels: int, net: NetFactory, num_components: int = 4, tol: float = 1e-6
    ):
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        super().__init__(num_channels, net, 3 * num_components + 2)
        self.num_components = num_components
        self.tol = tol

    def _params(self, cond: Tensor):
        p = _per_element(self.net(cond), self.c2)
        k = self.num_components
        logits, means = p[..., :k], p[..., k : 2 * k]
        log_scales = p[..., 2 * k : 3 * k].clamp_min(MIN_LOG_SCALE)
        a, b = torch.tanh(p[..., 3 * k]), p[..., 3 * k + 1]
        return logits, means, log_scales, a, b

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        logits, means, log_scales, a, b = self._params(x1)
        y, log_dy = mixture_logistic_logit(x2, logits, means, log_scales)
        z2 = y * torch.exp(a) + b
        return torch.cat([x1, z2], dim=1), sum_except_batch(log_dy + a)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = z[:, : self.c1], z[:, self.c1 :]
        logits, means, log_scales, a, b = self._params(z1)
        y = (z2 - b) * torch.exp(-a)
        x2 = mixture_logistic_logit_inverse(y, logits, means, log_scales, tol=self.tol)
        _, log_dy = mixture_logistic_logit(x2, logits, means, log_scales)
        return torch.cat([z1, x2], dim=1), -sum_except_batch(log_dy + a)
