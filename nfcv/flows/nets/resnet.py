"""RealNVP's coupling network (Dinh et al. 2016, arXiv:1605.08803)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from nfcv.flows.nets.common import float32_conv


class ResNetNet(nn.Module):
    """RealNVP's coupling network (Dinh et al. 2016, arXiv:1605.08803, section 4.1): a 3x3 conv,
    `num_blocks` pre-activation residual blocks (batch norm -> ReLU -> 3x3 conv, twice), batch
    norm -> ReLU, and a zero-initialised 3x3 output conv. Convs are weight-normalised (Salimans &
    Kingma 2016) as in the paper; batch norm uses batch statistics in training and running
    averages in evaluation, so the flow is deterministic (and exactly invertible) in eval mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        num_blocks: int = 8,
    ):
        super().__init__()
        if hidden_channels < 1 or num_blocks < 0:
            raise ValueError(
                f"need hidden_channels >= 1 and num_blocks >= 0, got {hidden_channels}, "
                f"{num_blocks}"
            )

        def conv(c_in: int, c_out: int) -> nn.Module:
            return weight_norm(nn.Conv2d(c_in, c_out, 3, padding=1))

        self.conv_in = conv(in_channels, hidden_channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(),
                conv(hidden_channels, hidden_channels),
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(),
                conv(hidden_channels, hidden_channels),
            )
            for _ in range(num_blocks)
        )
        self.norm_out = nn.BatchNorm2d(hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return float32_conv(self.conv_out, F.relu(self.norm_out(h)))
