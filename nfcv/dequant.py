"""Dequantization: integer images -> points of [0, 1]^D, with log q(u | x).

Uniform dequantization (Theis et al. 2016, arXiv:1511.01844) adds u ~ U[0, 1)^D, so log q = 0 and
the continuous likelihood lower-bounds the discrete one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dequantizer(nn.Module):
    """``forward(x, num_bins) -> (y, log_q)`` with ``y = (x + u) / num_bins``; `x` holds the
    integer pixel values as floats of the model's dtype."""

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError


class UniformDequantization(Dequantizer):
    """``u ~ U[0, 1)^D``, ``log q(u | x) = 0``."""

    def forward(self, x: Tensor, num_bins: int) -> tuple[Tensor, Tensor]:
        u = torch.rand_like(x)
        return (x + u) / num_bins, x.new_zeros(x.shape[0])
