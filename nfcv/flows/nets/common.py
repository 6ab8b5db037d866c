"""The parts every coupling network shares: the zero-initialised output convolution, and
the last layer's float32 under mixed precision."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.base import at_least_float32, no_autocast

# Glow's zero-initialised conv rescales its output by exp(3 * logs): a larger learning rate for the
# per-channel output scale (openai/glow, model.py, conv2d_zeros with logscale_factor=3).
ZERO_CONV_LOGSCALE_FACTOR = 3.0


def float32_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` with autocast off, in float32 at least: the last layer of a coupling network,
    whose outputs (shifts, scales, spline and mixture parameters) would otherwise be rounded to
    bfloat16's 8 significant bits under mixed precision and move the model's bits per dim by
    hundredths. The rest of the network keeps running in the low precision."""
    with no_autocast(x):
        return conv(at_least_float32(x))


class ZeroConv2d(nn.Module):
    """Conv whose weight, bias and per-channel log-scale start at zero, so it outputs 0 at init.

    Used as the last layer of every coupling network (each coupling starts as the identity) and
    for the learned priors of split levels (Glow, arXiv:1807.03039, section 3.3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The weight and bias of the one convolution this layer is: conv(x) * e is the conv
        with weight W * e and bias b * e, the output scale folded into the (small) weights
        instead of a pass over the output."""
        scale = torch.exp(self.logs * ZERO_CONV_LOGSCALE_FACTOR).view(-1)
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        with no_autocast(x):
            return F.conv2d(at_least_float32(x), weight, bias, padding=self.conv.padding)
