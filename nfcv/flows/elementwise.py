"""Elementwise bijections used for preprocessing."""

from __future__ import annotations

from torch import Tensor

from nfcv.flows.base import Bijector, zero_logdet


class Shift(Bijector):
    """``z = x + offset``; Glow maps [0, 1] images to [-0.5, 0.5] with offset -0.5 (log-det 0)."""

    def __init__(self, offset: float = -0.5):
        super().__init__()
        self.offset = float(offset)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.offset, zero_logdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z - self.offset, zero_logdet(z)
