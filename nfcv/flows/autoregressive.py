"""Autoregressive flows over images: MAF (Papamakarios et al. 2017, arXiv:1705.07057) and IAF
(Kingma et al. 2016, arXiv:1606.04934), one implementation with PixelCNN-style masked
convolutions (van den Oord et al. 2016, arXiv:1606.05328).

Elements are ordered in raster order within the level: row by row, left to right, and channel
by channel within a pixel. The conditioner's output for element i sees only elements before i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels, sum_except_batch

# The log-scale is soft-clamped to (-3, 3): a factor of at most e^3 per layer and element.
LOG_SCALE_BOUND = 3.0


class MaskedConv2d(nn.Conv2d):
    """A conv whose output for pixel (h, w), channel group j sees inputs above, to the left,
    and at (h, w) only in channel groups before j (`strict`, the first layer) or up to j.

    Channels are split into `groups` contiguous blocks, one per data channel.
    """

    def __init__(self, in_channels, out_channels, kernel_size, groups_count: int, strict: bool):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        k, r = kernel_size, kernel_size // 2
        mask = torch.zeros(out_channels, in_channels, k, k)
        mask[:, :, :r, :] = 1  # rows above
        mask[:, :, r, :r] = 1  # left in the same row
        g_out = torch.arange(out_channels) * groups_count // out_channels
        g_in = torch.arange(in_channels) * groups_count // in_channels
        allowed = g_in[None, :] < g_out[:, None] if strict else g_in[None, :] <= g_out[:, None]
        mask[:, :, r, r] = allowed.float()
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class MaskedAffineAutoregressive(Bijector):
    """Affine autoregressive flow ``z_i = (x_i - mu_i) * exp(-alpha_i)``, mu and alpha from
    x_<i (MAF), or its inverse ``x_i = z_i * exp(alpha_i) + mu_i`` with mu and alpha from z_<i
    (IAF, `inverse_autoregressive=True`).

    MAF's density pass (forward) is one network pass and its sampling pass (inverse) takes D
    sequential passes; IAF is the other way round. Log-det ``-sum alpha`` (MAF). The last
    layer starts at zero, so the layer starts as the identity.
    """

    def __init__(
        self,
        num_channels: int,
        hidden_per_channel: int = 8,
        kernel_size: int = 3,
        inverse_autoregressive: bool = False,
    ):
        super().__init__()
        c, hidden = num_channels, num_channels * hidden_per_channel
        self.num_channels = c
        self.inverse_autoregressive = inverse_autoregressive
        self.net = nn.Sequential(
            MaskedConv2d(c, hidden, kernel_size, c, strict=True),
            nn.ReLU(),
            MaskedConv2d(hidden, hidden, 1, c, strict=False),
            nn.ReLU(),
            MaskedConv2d(hidden, 2 * c, kernel_size, c, strict=False),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _params(self, v: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(v)  # output group j = channels (2j, 2j + 1)
        mu, raw = h[:, 0::2], h[:, 1::2]
        return mu, LOG_SCALE_BOUND * torch.tanh(raw / LOG_SCALE_BOUND)

    def _parallel(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The one-pass direction: x -> z with conditioner on x."""
        mu, alpha = self._params(x)
        return (x - mu) * torch.exp(-alpha), -sum_except_batch(alpha)

    def _sequential(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The D-pass direction: z -> x, filling x in raster order."""
        x = torch.zeros_like(z)
        _, c, height, width = z.shape
        for i in range(height):
            for j in range(width):
                for k in range(c):
                    mu, alpha = self._params(x)
                    value = z[:, k, i, j] * torch.exp(alpha[:, k, i, j]) + mu[:, k, i, j]
                    x = x.clone()
                    x[:, k, i, j] = value
        _, alpha = self._params(x)
        return x, sum_except_batch(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._sequential(x) if self.inverse_autoregressive else self._parallel(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.inverse_autoregressive:
            # IAF's inverse is MAF's forward with the roles of x and z swapped.
            return self._parallel(z)
        return self._sequential(z)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)
