"""Fixed channel permutations: RealNVP's and Glow's "reverse" and "shuffle" baselines
(Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.2). Volume-preserving."""

from __future__ import annotations

import torch
from torch import Tensor

from nfcv.flows.base import Bijector, check_channels, zero_logdet


class ChannelPermutation(Bijector):
    """``z = x[:, perm]`` with `kind` 'reverse' or 'shuffle' (a fixed random permutation drawn from
    `seed`). The permutation is a buffer, so a reloaded model uses the same one."""

    def __init__(self, num_channels: int, kind: str = "reverse", seed: int = 0):
        super().__init__()
        if kind == "reverse":
            perm = torch.arange(num_channels - 1, -1, -1)
        elif kind == "shuffle":
            perm = torch.randperm(num_channels, generator=torch.Generator().manual_seed(seed))
        else:
            raise ValueError(
                f"ChannelPermutation kind must be 'reverse' or 'shuffle', got {kind!r}"
            )
        self.num_channels = num_channels
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x[:, self.perm], zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z[:, self.inv_perm], zero_logdet(z)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)
