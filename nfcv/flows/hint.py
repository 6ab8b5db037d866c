"""Recursive (hierarchical) affine coupling, HINT (Kruse et al. 2021, arXiv:1905.10687)."""

from __future__ import annotations

import torch
from torch import Tensor

from nfcv.flows.base import Bijector, apply, check_channels
from nfcv.flows.coupling import AffineCoupling, NetFactory


class HINTCoupling(Bijector):
    """``x = (x1, x2) -> (HINT(x1), HINT(y2))`` with ``y2`` the affine coupling of x2 on x1.

    The coupling is applied, then each half is coupled again recursively down to single
    channels, so a C-channel block holds C - 1 couplings and its Jacobian is lower triangular
    over channels (dense below the diagonal, unlike one coupling's block structure).
    """

    def __init__(self, num_channels: int, net: NetFactory):
        super().__init__()
        if num_channels < 2:
            raise ValueError(f"HINTCoupling needs at least 2 channels, got {num_channels}")
        self.num_channels = num_channels
        self.coupling = AffineCoupling(num_channels, net)
        self.c1 = self.coupling.c1
        c2 = num_channels - self.c1
        self.first = HINTCoupling(self.c1, net) if self.c1 >= 2 else None
        self.second = HINTCoupling(c2, net) if c2 >= 2 else None

    def _halves(
        self, y: Tensor, inverse: bool, context: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        parts, total = [], y.new_zeros(y.shape[0])
        for sub, part in ((self.first, y[:, : self.c1]), (self.second, y[:, self.c1 :])):
            if sub is not None:
                part, logdet = apply(sub, part, context, inverse)
                total = total + logdet
            parts.append(part)
        return torch.cat(parts, dim=1), total

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, logdet = self.coupling(x, context)
        z, sub_logdet = self._halves(y, inverse=False, context=context)
        return z, logdet + sub_logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, sub_logdet = self._halves(z, inverse=True, context=context)
        x, logdet = self.coupling.inverse(y, context)
        return x, logdet + sub_logdet

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)
