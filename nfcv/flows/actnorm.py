"""Activation normalisation (Glow, Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels

# Channels whose first-batch standard deviation falls below this keep scale 1: dividing by a
# near-zero std would make the layer blow the channel up by ~1e6 and its log-det by ~14 nats/pixel.
MIN_INIT_STD = 1e-6


class ActNorm(Bijector):
    """Per-channel affine map ``z = (x + loc) * exp(log_scale)``.

    With `spatial` (H, W) the map has its own loc and scale at every channel and position, with
    statistics over the batch alone: Flow++'s data-initialised normalisation ("Norm",
    arXiv:1902.00275 code), which fixes the input's height and width.

    `loc` and `log_scale` are initialised from the first batch seen in training mode so that each
    channel has mean 0 and standard deviation 1 there (data-dependent init). The `initialized`
    flag is a buffer, so a model rebuilt from a checkpoint never initialises again. Before
    initialisation (for example Lightning's sanity-check validation, run in eval mode) the layer is
    the identity. Under `torch.distributed` the statistics are all-reduced over the global batch.
    """

    def __init__(self, num_channels: int, spatial: tuple[int, int] | list[int] | None = None):
        super().__init__()
        self.num_channels = num_channels
        self.spatial = None if spatial is None else tuple(int(s) for s in spatial)
        h, w = self.spatial or (1, 1)
        self.loc = nn.Parameter(torch.zeros(1, num_channels, h, w))
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, h, w))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        n = self.loc.numel()
        if self.spatial is None:
            xd = x.detach().double().transpose(0, 1).reshape(n, -1)
        else:
            xd = x.detach().double().reshape(x.shape[0], n).T
        stats = torch.stack([xd.sum(1), (xd * xd).sum(1), xd.new_full((n,), xd.shape[1])])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        total, total_sq, count = stats
        mean = total / count
        var = (total_sq / count - mean * mean).clamp_min(0.0)
        std = var.sqrt()
        log_scale = torch.where(std > MIN_INIT_STD, -torch.log(std), torch.zeros_like(std))
        self.loc.copy_((-mean).view_as(self.loc))
        self.log_scale.copy_(log_scale.view_as(self.log_scale))
        self.initialized.fill_(True)

    def _logdet(self, x: Tensor) -> Tensor:
        positions = 1 if self.spatial is not None else x.shape[2] * x.shape[3]
        return (positions * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x)
        return (x + self.loc) * torch.exp(self.log_scale), self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.log_scale) - self.loc, -self._logdet(z)

    def output_shape(self, shape):
        shape = check_channels(self, shape, self.num_channels)
        if self.spatial is not None and tuple(shape[1:]) != self.spatial:
            raise ValueError(
                f"ActNorm was built for {self.spatial[0]}x{self.spatial[1]} positions, got "
                f"shape {tuple(shape)}"
            )
        return shape
