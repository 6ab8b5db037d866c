"""Coupling networks. Each is a factory ``net(in_channels, out_channels) -> nn.Module`` (configs
pass them with ``_partial_: true``), so any coupling layer works with any network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.actnorm import ActNorm

# Glow's zero-initialised conv rescales its output by exp(3 * logs): a larger learning rate for the
# per-channel output scale (openai/glow, model.py, conv2d_zeros with logscale_factor=3).
ZERO_CONV_LOGSCALE_FACTOR = 3.0


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

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.logs * ZERO_CONV_LOGSCALE_FACTOR)


class _ActNormAct(nn.Module):
    """ActNorm used as a normaliser inside a network (its log-det is not part of the density)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(x)[0])


class GlowNet(nn.Module):
    """Glow's coupling network NN(): conv3x3 -> actnorm -> ReLU -> conv1x1 -> actnorm -> ReLU ->
    zero-init conv3x3 (arXiv:1807.03039, section 3.3 and appendix; convs carry no bias because
    ActNorm follows them)."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int = 512, dropout: float = 0.0
    ):
        super().__init__()
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            _ActNormAct(hidden_channels),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            _ActNormAct(hidden_channels),
            # Not in Glow; a regulariser for small datasets (Flow++ uses dropout in its nets).
            # Active in training only, so the flow is exactly invertible in eval mode.
            nn.Dropout(dropout),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )
        nn.init.normal_(self.net[0].weight, std=0.05)
        nn.init.normal_(self.net[2].weight, std=0.05)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
