"""Multi-scale architecture: squeeze, learned priors folded into the bijection, and the assembler
(RealNVP, arXiv:1605.08803, section 3.6; Glow, arXiv:1807.03039, figure 2)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nfcv.flows.base import (
    Bijector,
    Sequential,
    Shape,
    check_channels,
    sum_except_batch,
    zero_logdet,
)
from nfcv.flows.nets import ZeroConv2d

StepFactory = Callable[[int], Bijector]


class Squeeze(Bijector):
    """Space-to-depth: each 2x2 patch becomes 4 channels, ``(C, H, W) -> (4C, H/2, W/2)``.

    Channel ``4c + 2i + j`` holds pixel ``(2h + i, 2w + j)`` of input channel c (openai/glow's
    order).
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        x = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c // 4, 2 * h, 2 * w), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got shape {tuple(shape)}")
        return (4 * c, h // 2, w // 2)


class SplitPrior(Bijector):
    """Glow's learned prior for a factored-out half, as a bijection on the whole tensor.

    ``(z1, z2) -> (z1, (z2 - mu(z1)) * exp(-log_sigma(z1)))`` with ``mu, log_sigma`` from a
    zero-initialised conv of the kept half; log-det ``-sum log_sigma``. The caller then factors out
    the second half, which is N(0, I) under the model.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.c1 = num_channels // 2
        self.c2 = num_channels - self.c1
        self.net = ZeroConv2d(self.c1, 2 * self.c2)

    def _params(self, z1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = x[:, : self.c1], x[:, self.c1 :]
        mean, log_sigma = self._params(z1)
        eps = (z2 - mean) * torch.exp(-log_sigma)
        return torch.cat([z1, eps], dim=1), -sum_except_batch(log_sigma)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        z1, eps = z[:, : self.c1], z[:, self.c1 :]
        mean, log_sigma = self._params(z1)
        return torch.cat([z1, eps * torch.exp(log_sigma) + mean], dim=1), sum_except_batch(
            log_sigma
        )

    def output_shape(self, shape: Shape) -> Shape:
        return check_channels(self, shape, self.num_channels)


class LearnedPrior(Bijector):
    """Glow's learned top prior N(mu, sigma^2) per channel, folded in as ``(z - mu) / sigma``."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self.mean = nn.Parameter(torch.zeros(1, num_channels, 1, 1))
        self.log_sigma = nn.Parameter(torch.zeros(1, num_channels, 1, 1))

    def _logdet(self, x: Tensor) -> Tensor:
        return (-(x.shape[2] * x.shape[3]) * self.log_sigma.sum()).expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) * torch.exp(-self.log_sigma), self._logdet(x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z * torch.exp(self.log_sigma) + self.mean, -self._logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        return check_channels(self, shape, self.num_channels)


class MultiScale(Bijector):
    """Generic multi-scale assembler: ``(B, C, H, W) -> (B, D)``.

    Each of the `num_levels` levels squeezes, applies `steps_per_level` flow steps (each step is
    the given list of layer factories, called with the channel count) and its prior; every level
    but the last then factors out the second half of its channels. The output concatenates the
    flattened latents of all levels, first factored-out level first, last level last.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_levels: int,
        steps_per_level: int,
        step: Sequence[StepFactory],
        split_prior: StepFactory | None = SplitPrior,
        top_prior: StepFactory | None = LearnedPrior,
    ):
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if num_levels < 1 or steps_per_level < 0:
            raise ValueError(
                f"need levels >= 1 and steps >= 0, got levels={num_levels}, "
                f"steps={steps_per_level}"
            )
        c, h, w = image_shape
        factor = 2**num_levels
        if h % factor or w % factor:
            raise ValueError(
                f"image shape {image_shape}: height {h} and width {w} must be divisible by "
                f"2**levels = {factor} for levels={num_levels}; use fewer levels (model.levels) "
                "or resize the data"
            )
        self.image_shape = image_shape
        self.levels = nn.ModuleList()
        self.factored_shapes: list[Shape] = []
        shape: Shape = image_shape
        for level in range(num_levels):
            squeeze = Squeeze()
            channels = squeeze.output_shape(shape)[0]
            layers: list[Bijector] = [squeeze]
            for _ in range(steps_per_level):
                layers.extend(factory(channels) for factory in step)
            last = level == num_levels - 1
            prior = top_prior if last else split_prior
            if prior is not None:
                layers.append(prior(channels))
            body = Sequential(layers)
            out = body.output_shape(shape)  # checks every layer against the shape it will see
            if last:
                self.factored_shapes.append(out)
            else:
                keep = out[0] // 2
                self.factored_shapes.append((out[0] - keep, *out[1:]))
                shape = (keep, *out[1:])
            self.levels.append(body)
        self.latent_sizes = [math.prod(s) for s in self.factored_shapes]

    @property
    def latent_dim(self) -> int:
        return sum(self.latent_sizes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = zero_logdet(x)
        outs = []
        for i, body in enumerate(self.levels):
            x, logdet = body(x)
            total = total + logdet
            if i < len(self.levels) - 1:
                c_keep = x.shape[1] // 2
                outs.append(x[:, c_keep:].reshape(x.shape[0], -1))
                x = x[:, :c_keep]
        outs.append(x.reshape(x.shape[0], -1))
        return torch.cat(outs, dim=1), total

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        parts = torch.split(z, self.latent_sizes, dim=1)
        b = z.shape[0]
        total = zero_logdet(z)
        x = parts[-1].reshape(b, *self.factored_shapes[-1])
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([x, parts[i].reshape(b, *self.factored_shapes[i])], dim=1)
            x, logdet = self.levels[i].inverse(x)
            total = total + logdet
        return x, total

    def output_shape(self, shape: Shape) -> Shape:
        if tuple(shape) != self.image_shape:
            raise ValueError(
                f"MultiScale was built for image shape {self.image_shape}, got {tuple(shape)}"
            )
        return (self.latent_dim,)
