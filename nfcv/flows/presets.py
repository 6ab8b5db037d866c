"""Assemblers of the classic image architectures, each a bijection ``(B, C, H, W) -> (B, D)``:
NICE (Dinh et al. 2014, arXiv:1410.8516), RealNVP (Dinh et al. 2016, arXiv:1605.08803) and Flow++
(Ho et al. 2019, arXiv:1902.00275). Glow is `MultiScale` with Glow's steps (see
configs/model/glow.yaml). The coupling layers and networks are factories from the configs; the
assemblers fix only what the papers fix: the order of masks, squeezes and splits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from nfcv.flows.actnorm import MIN_INIT_STD, ActNorm, DataInit
from nfcv.flows.base import Bijector, Flatten, Sequential, Shape, zero_logdet
from nfcv.flows.conv1x1 import BlockInvConv1x1
from nfcv.flows.elementwise import LogisticToNormal
from nfcv.flows.multiscale import (
    ColumnMerge,
    ColumnSplit,
    Levels,
    Squeeze,
    SwapHalves,
    check_divisible,
)

CouplingFactory = Callable[..., Bijector]


def _check_dim(layer: nn.Module, shape: Shape, dim: int) -> Shape:
    if tuple(shape) != (dim,):
        raise ValueError(f"{type(layer).__name__} was built for ({dim},) inputs, got {shape}")
    return tuple(shape)


class VectorAdditiveCoupling(Bijector):
    """NICE's additive coupling on flat vectors (arXiv:1410.8516, section 3.2): the elements of
    index parity `parity` are kept, the others get ``+ m(kept)``; log-det 0. The network's last
    layer starts at zero, so the coupling starts as the identity."""

    def __init__(self, dim: int, net: Callable[[int, int], nn.Module], parity: int = 0):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling needs at least 2 dimensions, got {dim}")
        self.dim = dim
        self.parity = int(parity) % 2
        keep = torch.arange(self.parity, dim, 2)
        change = torch.arange(1 - self.parity, dim, 2)
        self.register_buffer("keep", keep, persistent=False)
        self.register_buffer("change", change, persistent=False)
        self.net = net(len(keep), len(change))

    def _couple(self, x: Tensor, sign: float) -> Tensor:
        if self.dim % 2 == 0:  # element 2i + p is pair i's p-th: strided views, no gather
            pairs = x.reshape(x.shape[0], self.dim // 2, 2)
            kept = pairs[..., self.parity]
            changed = pairs[..., 1 - self.parity] + sign * self.net(kept)
            parts = (kept, changed) if self.parity == 0 else (changed, kept)
            return torch.stack(parts, dim=2).view(x.shape[0], self.dim)
        return self._couple_indexed(x, sign)

    def _couple_indexed(self, x: Tensor, sign: float) -> Tensor:
        y = x.clone()
        y[:, self.change] = x[:, self.change] + sign * self.net(x[:, self.keep])
        return y

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, 1.0), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, -1.0), zero_logdet(z)

    def output_shape(self, shape: Shape) -> Shape:
        return _check_dim(self, shape, self.dim)


class VectorScale(Bijector, DataInit):
    """NICE's diagonal scaling layer ``z = x * exp(s)`` (arXiv:1410.8516, section 3.3): one learned
    log-scale per dimension, log-det ``sum(s)``. Starts as the identity, or, with `data_init`,
    at ``s = -log std`` of the first training batch (dimensions constant in that batch keep
    s = 0), so the prior sees unit-variance inputs from the first step (Glow's ActNorm idea,
    arXiv:1807.03039, section 3.1; not in NICE, which trains for thousands of epochs instead).
    The `initialized` flag is a buffer, so a reloaded model never initialises again."""

    def __init__(self, dim: int, data_init: bool = False):
        super().__init__()
        self.dim = dim
        self.data_init = bool(data_init)
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self._init_flag(not self.data_init)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        std = x.detach().double().std(dim=0) if x.shape[0] > 1 else torch.zeros(self.dim)
        log_scale = torch.where(std > MIN_INIT_STD, -torch.log(std), torch.zeros_like(std))
        self.log_scale.copy_(log_scale)
        self._mark_initialized()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.needs_init():
            self.initialize(x)
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z * torch.exp(-self.log_scale), -self.log_scale.sum().expand(z.shape[0])

    def output_shape(self, shape: Shape) -> Shape:
        return _check_dim(self, shape, self.dim)


class NICE(Sequential):
    """NICE (arXiv:1410.8516, section 5): the image flattened, `num_couplings` additive
    couplings on alternating odd/even partitions, a final diagonal scaling, and the prior:
    ``"gaussian"``, or ``"logistic"`` (the paper's, folded in by `LogisticToNormal` so the base
    stays N(0, I)). No multi-scale. `data_init` initialises the scaling from the first batch
    (see `VectorScale`).

    `linear` (not in the paper): a factory ``linear(D)`` of a linear flow on the flat (D,)
    vector, e.g. `FullLinear`, put before every coupling, so which elements condition which is
    learned rather than only the fixed odd/even alternation (as Glow's 1x1 convolutions
    generalise RealNVP's fixed permutations, arXiv:1807.03039, section 3.2)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        net: Callable[[int, int], nn.Module],
        num_couplings: int = 4,
        prior: str = "logistic",
        data_init: bool = True,
        linear: Callable[[int], Bijector] | None = None,
    ):
        if prior not in ("gaussian", "logistic"):
            raise ValueError(f"NICE prior must be 'gaussian' or 'logistic', got {prior!r}")
        if num_couplings < 1:
            raise ValueError(f"num_couplings must be >= 1, got {num_couplings}")
        image_shape = tuple(int(s) for s in image_shape)
        dim = int(torch.tensor(image_shape).prod())
        layers: list[Bijector] = [Flatten(image_shape)]
        for i in range(num_couplings):
            if linear is not None:
                layers.append(linear(dim))
            layers.append(VectorAdditiveCoupling(dim, net, parity=i % 2))
        layers.append(VectorScale(dim, data_init=data_init))
        if prior == "logistic":
            layers.append(LogisticToNormal())
        super().__init__(layers)
        self.image_shape = image_shape
        self.latent_sizes = [dim]


class RealNVP(Levels):
    """RealNVP's multi-scale architecture (arXiv:1605.08803, section 3.6): at each of the first
    ``num_scales - 1`` scales, `checkerboard_steps` checkerboard couplings (alternating masks),
    a squeeze, `channel_steps` channel-wise couplings (alternating halves), and half of the
    channels factored out; at the last scale, `final_steps` checkerboard couplings. The paper
    uses 3, 3 and 4; CIFAR-10 uses two scales ("downscale only once", section 4.1).

    `coupling(num_channels, mask=..., parity=...)` builds each coupling.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        coupling: CouplingFactory,
        num_scales: int = 2,
        checkerboard_steps: int = 3,
        channel_steps: int = 3,
        final_steps: int = 4,
    ):
        image_shape = tuple(int(s) for s in image_shape)
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        check_divisible(image_shape, num_scales - 1, f"num_scales={num_scales} (model.scales)")

        def checkerboard(c: int, n: int) -> list[Bijector]:
            return [coupling(c, mask="checkerboard", parity=i % 2) for i in range(n)]

        bodies: list[Bijector] = []
        c = image_shape[0]
        for _ in range(num_scales - 1):
            channel = [coupling(4 * c, mask="channel", parity=i % 2) for i in range(channel_steps)]
            bodies.append(Sequential([*checkerboard(c, checkerboard_steps), Squeeze(), *channel]))
            c *= 2
        bodies.append(Sequential(checkerboard(c, final_steps)))
        super().__init__(image_shape, bodies, [True] * (num_scales - 1) + [False])


class FlowPP(Levels):
    """Flow++'s architecture (arXiv:1902.00275, section 4; aravindsrinivas/flowpp,
    run_cifar.py). `scales` lists ``[channel_steps, checkerboard_steps]`` per scale, with a
    squeeze (`space_to_depth` order) before every scale but the first; CIFAR-10's is
    ``[[0, 4], [2, 3]]``. Every step is: per-position ActNorm, an invertible 1x1 convolution on
    each half, the coupling, and a swap of the halves. Checkerboard steps run between a
    `ColumnSplit` and its inverse (the code's checkerboard: even and odd columns). With
    `factor_out`, half of the channels leave after every scale but the last (the CIFAR-10 model
    factors out nothing).

    `coupling(num_channels, mask="channel", net_kwargs={"spatial": (H, W)})` builds each coupling.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        coupling: CouplingFactory,
        scales: Sequence[Sequence[int]] = ((0, 4), (2, 3)),
        factor_out: bool = False,
    ):
        image_shape = tuple(int(s) for s in image_shape)
        scales = [tuple(int(n) for n in s) for s in scales]
        if not scales or any(len(s) != 2 or min(s) < 0 for s in scales):
            raise ValueError(
                f"scales must be a list of [channel_steps, checkerboard_steps], got {scales}"
            )
        check_divisible(image_shape, len(scales) - 1, f"{len(scales)} scales (model.scales)")

        def steps(shape: Shape, n: int) -> list[Bijector]:
            c, h, w = shape
            if n and c % 2:
                raise ValueError(
                    f"Flow++ channel-wise steps need an even channel count, got shape {shape}: "
                    "use checkerboard steps at this scale"
                )
            layers: list[Bijector] = []
            for _ in range(n):
                layers += [
                    ActNorm(c, spatial=(h, w)),
                    BlockInvConv1x1(c, groups=2),
                    coupling(c, mask="channel", net_kwargs={"spatial": (h, w)}),
                    SwapHalves(),
                ]
            return layers

        bodies: list[Bijector] = []
        shape: Shape = image_shape
        for i, (n_channel, n_checker) in enumerate(scales):
            layers: list[Bijector] = []
            if i > 0:
                layers.append(Squeeze(order="depth"))
                shape = layers[-1].output_shape(shape)
            layers += steps(shape, n_channel)
            if n_checker:
                split = ColumnSplit()
                layers += [split, *steps(split.output_shape(shape), n_checker), ColumnMerge()]
            bodies.append(Sequential(layers))
            if factor_out and i < len(scales) - 1:
                shape = (shape[0] // 2, *shape[1:])
        flags = [factor_out and i < len(scales) - 1 for i in range(len(scales))]
        super().__init__(image_shape, bodies, flags)
