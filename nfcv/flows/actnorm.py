"""Activation normalisation (Glow, Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels

# Channels whose first-batch standard deviation falls below this keep scale 1: dividing by a
# near-zero std would make the layer blow the channel up by ~1e6 and its log-det by ~14 nats/pixel.
MIN_INIT_STD = 1e-6


class DataInit(nn.Module):
    """A layer initialised from the first training batch it sees, with the flag kept twice: the
    `initialized` buffer (saved in checkpoints, so a reloaded model never initialises again) and
    a host-side copy that `needs_init` reads, so asking costs no device-to-host copy in a
    training step (``bool(buffer)`` on a GPU would stall the queue in every forward). The host
    copy is set from the buffer when the layer is built and when a state dict is loaded, and by
    `_mark_initialized`; write the flag through those, never into the buffer directly."""

    def _init_flag(self, value: bool) -> None:
        self.register_buffer("initialized", torch.tensor(bool(value)))
        self._initialized_host = bool(value)
        self.register_load_state_dict_post_hook(DataInit._reread_flag)

    @staticmethod
    def _reread_flag(module: DataInit, incompatible_keys) -> None:
        module._initialized_host = bool(module.initialized)  # at load time, not in a step

    def needs_init(self) -> bool:
        """In training mode and not yet initialised (no device read)."""
        return self.training and not self._initialized_host

    def _mark_initialized(self) -> None:
        self.initialized.fill_(True)
        self._initialized_host = True


class ActNorm(Bijector, DataInit):
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
        self._init_flag(False)

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
        self._mark_initialized()

    def _logdet(self, x: Tensor) -> Tensor:
        positions = 1 if self.spatial is not None else x.shape[2] * x.shape[3]
        return (positions * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.needs_init():
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
