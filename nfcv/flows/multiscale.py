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
    apply,
    check_channels,
    sum_except_batch,
    zero_logdet,
)
from nfcv.flows.nets import ZeroConv2d

StepFactory = Callable[[int], Bijector]


class Squeeze(Bijector):
    """Space-to-depth: each 2x2 patch becomes 4 channels, ``(C, H, W) -> (4C, H/2, W/2)``.

    `order="glow"`: channel ``4c + 2i + j`` holds pixel ``(2h + i, 2w + j)`` of input channel c
    (openai/glow's order). `order="depth"`: channel ``(2i + j) C + c`` holds it (TensorFlow's
    `space_to_depth`, which Flow++ uses: a channel split then separates patch rows).
    """

    def __init__(self, order: str = "glow"):
        super().__init__()
        if order not in ("glow", "depth"):
            raise ValueError(f"Squeeze order must be 'glow' or 'depth', got {order!r}")
        self.order = order

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        z = x.reshape(b, c, h // 2, 2, w // 2, 2)
        z = z.permute(0, 1, 3, 5, 2, 4) if self.order == "glow" else z.permute(0, 3, 5, 1, 2, 4)
        return z.reshape(b, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = z.shape
        if self.order == "glow":
            x = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        else:
            x = z.reshape(b, 2, 2, c // 4, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, c // 4, 2 * h, 2 * w), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got shape {tuple(shape)}")
        return (4 * c, h // 2, w // 2)


class ColumnSplit(Bijector):
    """Flow++'s "checkerboard split" (arXiv:1902.00275 code): even and odd columns become the two
    halves of the channels, ``(C, H, W) -> (2C, H, W/2)``, so a channel-mask coupling after it
    conditions the odd columns on the even ones at half the width. Volume-preserving."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        z = x.reshape(b, c, h, w // 2, 2).permute(0, 4, 1, 2, 3)
        return z.reshape(b, 2 * c, h, w // 2), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, c2, h, w = z.shape
        x = z.reshape(b, 2, c2 // 2, h, w).permute(0, 2, 3, 4, 1)
        return x.reshape(b, c2 // 2, h, 2 * w), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if w % 2:
            raise ValueError(f"ColumnSplit needs an even width, got shape {tuple(shape)}")
        return (2 * c, h, w // 2)


class ColumnMerge(Bijector):
    """The inverse of `ColumnSplit`: ``(2C, H, W) -> (C, H, 2W)``."""

    def __init__(self):
        super().__init__()
        self.split = ColumnSplit()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.split.inverse(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.split(z)

    def output_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if c % 2:
            raise ValueError(f"ColumnMerge needs an even channel count, got shape {tuple(shape)}")
        return (c // 2, h, 2 * w)


class SwapHalves(Bijector):
    """``(x_a, x_b) -> (x_b, x_a)`` over the channel halves (Flow++'s `TupleFlip`), so the next
    coupling transforms the half this one conditioned on. Volume-preserving."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = x.shape[1] // 2
        return torch.cat([x[:, c:], x[:, :c]], dim=1), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = z.shape[1] - z.shape[1] // 2
        return torch.cat([z[:, c:], z[:, :c]], dim=1), zero_logdet(z)


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
        b, _, height, width = h.shape
        # channels 0, 2, 4, ... and 1, 3, 5, ...: one unbind (one backward) for both
        mean, log_sigma = h.view(b, self.c2, 2, height, width).unbind(2)
        return mean, log_sigma

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z1, z2 = x.split([self.c1, self.c2], dim=1)
        mean, log_sigma = self._params(z1)
        eps = (z2 - mean) * torch.exp(-log_sigma)
        return torch.cat([z1, eps], dim=1), -sum_except_batch(log_sigma)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
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

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (x - self.mean) * torch.exp(-self.log_sigma), self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(self.log_sigma) + self.mean, -self._logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        return check_channels(self, shape, self.num_channels)


class Levels(Bijector):
    """Bodies applied one after another, with the second half of the channels factored out after
    the bodies marked in `factor_out`: ``(B, C, H, W) -> (B, D)``.

    The output concatenates the flattened factored-out halves, first factored-out first, then the
    flattened output of the last body; `latent_sizes` gives the size of each block. The shapes of
    every body are checked here, when the model is built.
    """

    def __init__(
        self, image_shape: Sequence[int], bodies: Sequence[Bijector], factor_out: Sequence[bool]
    ):
        super().__init__()
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if len(bodies) != len(factor_out) or not bodies:
            raise ValueError("need one factor_out flag per body, and at least one body")
        self.image_shape = image_shape
        self.levels = nn.ModuleList(bodies)
        self.factor_out = [bool(f) for f in factor_out]
        self.factored_shapes: list[Shape] = []
        shape: Shape = image_shape
        for body, split in zip(self.levels, self.factor_out, strict=True):
            out = body.output_shape(shape)
            if split:
                if len(out) != 3 or out[0] < 2:
                    raise ValueError(f"cannot factor out half of the channels of shape {out}")
                keep = out[0] // 2
                self.factored_shapes.append((out[0] - keep, *out[1:]))
                shape = (keep, *out[1:])
            else:
                shape = out
        self.factored_shapes.append(tuple(shape))
        self.latent_sizes = [math.prod(s) for s in self.factored_shapes]

    @property
    def latent_dim(self) -> int:
        return sum(self.latent_sizes)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_logdet(x)
        outs = []
        for body, split in zip(self.levels, self.factor_out, strict=True):
            x, logdet = apply(body, x, context)
            total = total + logdet
            if split:
                c_keep = x.shape[1] // 2
                x, out = x.split([c_keep, x.shape[1] - c_keep], dim=1)
                outs.append(out.reshape(x.shape[0], -1))
        outs.append(x.reshape(x.shape[0], -1))
        return torch.cat(outs, dim=1), total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        parts = list(torch.split(z, self.latent_sizes, dim=1))
        b = z.shape[0]
        total = zero_logdet(z)
        x = parts.pop().reshape(b, *self.factored_shapes[-1])
        for i in reversed(range(len(self.levels))):
            if self.factor_out[i]:
                x = torch.cat([x, parts.pop().reshape(b, *self.factored_shapes[len(parts)])], 1)
            x, logdet = apply(self.levels[i], x, context, inverse=True)
            total = total + logdet
        return x, total

    def output_shape(self, shape: Shape) -> Shape:
        if tuple(shape) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__} was built for image shape {self.image_shape}, got "
                f"{tuple(shape)}"
            )
        return (self.latent_dim,)


def check_divisible(image_shape: Sequence[int], squeezes: int, what: str) -> None:
    _, h, w = image_shape
    factor = 2**squeezes
    if h % factor or w % factor:
        raise ValueError(
            f"image shape {tuple(image_shape)}: height {h} and width {w} must be divisible by "
            f"2**{squeezes} = {factor} for {what}; use fewer levels or resize the data"
        )


class MultiScale(Levels):
    """Glow's multi-scale assembler: ``(B, C, H, W) -> (B, D)``.

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
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if num_levels < 1 or steps_per_level < 0:
            raise ValueError(
                f"need levels >= 1 and steps >= 0, got levels={num_levels}, "
                f"steps={steps_per_level}"
            )
        check_divisible(image_shape, num_levels, f"levels={num_levels} (model.levels)")
        bodies = []
        channels = image_shape[0]
        for level in range(num_levels):
            channels *= 4
            layers: list[Bijector] = [Squeeze()]
            for _ in range(steps_per_level):
                layers.extend(factory(channels) for factory in step)
            last = level == num_levels - 1
            prior = top_prior if last else split_prior
            if prior is not None:
                layers.append(prior(channels))
            bodies.append(Sequential(layers))
            if not last:
                channels //= 2
        super().__init__(image_shape, bodies, [i < num_levels - 1 for i in range(num_levels)])
