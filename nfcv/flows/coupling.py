"""Coupling layers over channel halves: additive (NICE, Dinh et al. 2014, arXiv:1410.8516) and
affine (RealNVP, Dinh et al. 2016, arXiv:1605.08803; Glow's variant, arXiv:1807.03039)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels, sum_except_batch, zero_logdet

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
