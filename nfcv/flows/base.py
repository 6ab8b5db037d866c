"""The bijector interface every flow layer implements, and the containers that compose them.

A `Bijector` maps ``x -> z`` in `forward` and ``z -> x`` in `inverse`; both return the output and
the log-absolute-determinant of *their own* Jacobian, one value per sample. Containers sum the
log-dets; layers never see a running total (nflows' convention, arXiv:1906.04032 code).

Both take an optional `context`: what a conditional flow is conditioned on (the image's context
map in variational dequantization, for example). Containers pass it to every layer; a layer that
does not condition on anything ignores it, so any layer can sit in a conditional flow.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

Shape = tuple[int, ...]


class Bijector(nn.Module):
    """An invertible map with a tractable log-determinant.

    Subclasses implement ``forward(x, context=None)`` and ``inverse(z, context=None)``.
    `output_shape` maps a per-sample input shape to
    the per-sample output shape and raises `ValueError` when the layer cannot take that shape, so
    a model is checked once when it is built rather than at its first batch.
    """

    def forward(  # pragma: no cover - interface
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(  # pragma: no cover - interface
        self, z: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def output_shape(self, shape: Shape) -> Shape:
        return tuple(shape)


def check_channels(layer: nn.Module, shape: Shape, channels: int) -> Shape:
    """`output_shape` of a shape-preserving layer built for `channels` channels of (C, H, W)."""
    if len(shape) != 3 or shape[0] != channels:
        raise ValueError(
            f"{type(layer).__name__} was built for (C={channels}, H, W) inputs, got {tuple(shape)}"
        )
    return tuple(shape)


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 if it is in a lower precision (bf16/fp16 under autocast), else as it is."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum over every dimension but the first: per-sample log-densities and log-dets.

    Accumulates in float32 at least: a log-det summed in bfloat16 (8 significant bits) over
    thousands of elements would be off by whole nats.
    """
    return at_least_float32(x).reshape(x.shape[0], -1).sum(dim=1)


def no_autocast(x: Tensor):
    """A context that turns autocast off on `x`'s device: for the flow's own linear maps, whose
    outputs are the main path of the bijection (and whose inverses must undo them exactly)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def apply(
    layer: Bijector, x: Tensor, context: Tensor | None = None, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """``layer(x, context)`` or ``layer.inverse(x, context)``, as containers call their layers;
    without a context the layer is called as ``layer(x)``, so a layer written without the
    `context` argument still composes."""
    fn = layer.inverse if inverse else layer
    return fn(x) if context is None else fn(x, context)


def zero_logdet(x: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0])


class Sequential(Bijector):
    """Composition ``f_n o ... o f_1``; log-dets add (chain rule)."""

    def __init__(self, layers: Iterable[Bijector]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_logdet(x)
        for layer in self.layers:
            x, logdet = apply(layer, x, context)
            total = total + logdet
        return x, total

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = zero_logdet(z)
        for layer in reversed(self.layers):
            z, logdet = apply(layer, z, context, inverse=True)
            total = total + logdet
        return z, total

    def output_shape(self, shape: Shape) -> Shape:
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> Bijector:
        return self.layers[i]


class Flatten(Bijector):
    """Reshape ``(B, *shape)`` to ``(B, D)``; volume-preserving."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], -1), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z.reshape(z.shape[0], *self.shape), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        if tuple(shape) != self.shape:
            raise ValueError(f"Flatten expects inputs of shape {self.shape}, got {tuple(shape)}")
        return (math.prod(int(s) for s in shape),)
