"""Jet (Kolesnikov et al. 2024, "Jet: A Modern Transformer-Based Normalizing Flow",
arXiv:2412.15129; google-research/big_vision, big_vision/models/proj/jet/jet.py): affine couplings
on the patch tokens of an image whose conditioners are ViTs, alternating channel-wise splits (a
fixed random permutation of each token's values, the second half transformed) and spatial splits
(half of the tokens, in checkerboard or stripe patterns).

Layout of the authors' code, kept here:

- a coupling splits the (N, D) tokens into a conditioning half x1 and a transformed half x2, both
  of N D / 2 values: channel-wise, x1 is the first D/2 values of every token after the
  permutation; spatially, x1 is the N/2 tokens of the pattern, x2 the others;
- the conditioner always sees N tokens of D/2 values: for a spatial split each kept token of D
  values is cut into two consecutive tokens of D/2 (``n (s c) -> (n s) c``, s = 2), so one network
  shape serves both kinds (the code's scan over layers needs it), and its D/2 + D/2 outputs per
  token are put back the same way;
- ``y2 = (x2 + b) * s`` with ``s = scale_factor * sigmoid(h)`` in (0, scale_factor), 1 when the
  zero-initialised output layer gives h = 0 (so every coupling starts as the identity), and
  log-det ``sum(log sigmoid(h) + log scale_factor)`` over x2, exact per sample;
- the ViT: a linear projection in, a learned position embedding (normal, std 1/sqrt(width)),
  pre-LayerNorm blocks (multi-head self-attention, an MLP of 4 x width with tanh-GELU), a final
  LayerNorm and a zero-initialised linear projection out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from nfcv.flows.base import (
    Bijector,
    Flatten,
    Sequential,
    Shape,
    at_least_float32,
    no_autocast,
    sum_except_batch,
)
from nfcv.flows.patch import Patchify

# The spatial patterns of the authors' code (get_spatial_coupling_init); "-inv" swaps the halves.
SPATIAL_SPLITS = (
    "checkerboard",
    "checkerboard-inv",
    "vstripes",
    "vstripes-inv",
    "hstripes",
    "hstripes-inv",
)
SPLITS = ("channels", *SPATIAL_SPLITS)
KINDS = ("channels", "spatial")
# flax's lecun_normal: a normal truncated at two standard deviations, rescaled so that its
# standard deviation is sqrt(1 / fan_in) (0.8796... is the std of the unit normal cut at +-2).
_TRUNCATED_NORMAL_STD = 0.87962566103423978


class _Block(nn.Module):
    """A pre-LayerNorm transformer block (big_vision's vit.Encoder1DBlock): ``x + attn(LN(x))``,
    then ``x + mlp(LN(x))``. Attention runs through `scaled_dot_product_attention`, so a GPU uses
    its fused kernels. Weights are initialised as big_vision's: Xavier-uniform kernels (q, k and
    v each as its own width x width matrix), zero attention biases, MLP biases of std 1e-6."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)
        self.drop = nn.Dropout(dropout)
        with torch.no_grad():
            for chunk in self.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(chunk)
            nn.init.zeros_(self.qkv.bias)
            nn.init.xavier_uniform_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
            for fc in (self.fc1, self.fc2):
                nn.init.xavier_uniform_(fc.weight)
                nn.init.normal_(fc.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        b, n, w = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head size)
        y = F.scaled_dot_product_attention(q, k, v)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, n, w)))
        y = self.fc2(self.drop(F.gelu(self.fc1(self.norm2(x)), approximate="tanh")))
        return x + self.drop(y)


class JetViT(nn.Module):
    """Jet's coupling network (big_vision jet.py, `DNN`): ``(B, N, in_features) -> (B, N,
    out_features)``, a ViT over the N tokens: linear in, learned position embedding, `depth`
    pre-LayerNorm blocks of `heads` heads, final LayerNorm, zero-initialised linear out (run in
    float32 with autocast off, so under bf16 the shifts and scales keep float32's precision).
    `dropout` (not in the paper) acts after attention and in the MLP, in training only."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tokens: int,
        width: int = 64,
        depth: int = 1,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width < 1 or depth < 0 or heads < 1 or mlp_ratio < 1:
            raise ValueError(
                f"JetViT needs width >= 1, depth >= 0, heads >= 1 and mlp_ratio >= 1, got width "
                f"{width}, depth {depth}, heads {heads}, mlp_ratio {mlp_ratio}"
            )
        if width % heads:
            raise ValueError(
                f"the ViT width {width} is not divisible by its {heads} attention heads: choose "
                f"a width that is a multiple of the head count (e.g. "
                f"{heads * max(1, width // heads)})"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_tokens = int(num_tokens)
        self.embed = nn.Linear(in_features, width)
        with torch.no_grad():
            std = math.sqrt(1.0 / in_features) / _TRUNCATED_NORMAL_STD
            nn.init.trunc_normal_(self.embed.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(self.embed.bias)
        self.pos = nn.Parameter(torch.randn(1, num_tokens, width) / math.sqrt(width))
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.out = nn.Linear(width, out_features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        with no_autocast(h):
            return self.out(at_least_float32(h))


def spatial_halves(split: str, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The token indices (raster order on a `grid` of gh x gw tokens) of the conditioning half and
    of the transformed half for a spatial `split`, as the authors' code draws them: "vstripes"
    even / odd token indices, "hstripes" even / odd rows, "checkerboard" the parity of index +
    row; "-inv" swaps the halves. ValueError when the pattern does not cut the grid in two
    equal halves."""
    gh, gw = grid
    n = gh * gw
    index = torch.arange(n, device="cpu")  # built on the CPU, whatever the default device
    row = index // gw
    base = split.removesuffix("-inv")
    if base == "vstripes":
        first = index % 2 == 0
    elif base == "hstripes":
        first = row % 2 == 0
    elif base == "checkerboard":
        first = (index + row) % 2 == 0
    else:
        choices = ", ".join(SPATIAL_SPLITS)
        raise ValueError(f"unknown spatial split {split!r}; choose from {choices}")
    if int(first.sum()) * 2 != n:
        raise ValueError(
            f"the spatial split {split!r} does not cut a {gh}x{gw} grid of patch tokens into two "
            "equal halves: choose a patch size that gives an even number of tokens per row "
            "and column, or couplings without spatial splits (model.kinds=[channels])"
        )
    idx1, idx2 = index[first], index[~first]
    return (idx2, idx1) if split.endswith("-inv") else (idx1, idx2)


class JetCoupling(Bijector):
    """One Jet coupling on (B, N, D) tokens (arXiv:2412.15129, section 3; big_vision jet.py,
    `Coupling`); see the module docstring for the layout.

    `split`: "channels" (a fixed random permutation of each token's D values drawn from `seed`,
    then the first D/2 condition the last D/2) or one of `SPATIAL_SPLITS` on a `grid` of
    (gh, gw) tokens (None: a square grid). `net(D/2, D, N)` builds the conditioner; its outputs
    are the shift (first D/2) and the raw scale (last D/2) of every transformed value.
    `scale_factor`: the scale's upper bound (the paper's 2). The permutation and the token order
    are buffers (the checkpoint keeps them)."""

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        net: Callable[..., nn.Module],
        split: str = "channels",
        grid: Sequence[int] | None = None,
        seed: int = 0,
        scale_factor: float = 2.0,
    ):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"unknown Jet split {split!r}; choose from {', '.join(SPLITS)}")
        if dim % 2:
            raise ValueError(
                f"a Jet coupling halves each token's {dim} values: choose a patch size that "
                "gives tokens of an even number of values (p * p * C even)"
            )
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}")
        self.num_tokens, self.dim = int(num_tokens), int(dim)
        self.split = split
        self.scale_factor = float(scale_factor)
        if grid is None:  # the channel split does not need the grid; a spatial one does
            side = math.isqrt(self.num_tokens)
            if side * side != self.num_tokens and split != "channels":
                raise ValueError(
                    f"{self.num_tokens} tokens are not a square grid: give the coupling the grid "
                    "of patches (grid=[rows, columns])"
                )
            grid = (side, side) if side * side == self.num_tokens else (1, self.num_tokens)
        self.grid = tuple(int(g) for g in grid)
        if self.grid[0] * self.grid[1] != self.num_tokens:
            raise ValueError(f"a {self.grid} grid does not hold {self.num_tokens} tokens")
        if split == "channels":
            generator = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(self.dim, generator=generator, device="cpu")
        else:
            order = torch.cat(spatial_halves(split, self.grid))
        # Channel split: new value j is old value order[j]; spatial: new token m is old order[m].
        self.register_buffer("order", order)
        self.net = net(self.dim // 2, self.dim, self.num_tokens)

    # Set by `ImageFlow.checkpoint_networks`: recompute the ViT in the backward pass.
    checkpoint_grads = False

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.split == "channels":
            return x[..., self.order].chunk(2, dim=-1)
        return x[:, self.order].chunk(2, dim=1)

    def _merge(self, x1: Tensor, x2: Tensor) -> Tensor:
        inverse = torch.argsort(self.order)
        if self.split == "channels":
            return torch.cat([x1, x2], dim=-1)[..., inverse]
        return torch.cat([x1, x2], dim=1)[:, inverse]

    def _params(self, x1: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        # N tokens of D/2 values: channel-wise as it is, spatially each kept token cut in two.
        cond = x1.reshape(x1.shape[0], self.num_tokens, self.dim // 2)
        if self.checkpoint_grads and torch.is_grad_enabled() and self.training:
            h = torch.utils.checkpoint.checkpoint(self.net, cond, use_reentrant=False)
        else:
            h = self.net(cond)
        shift, raw = at_least_float32(h).chunk(2, dim=-1)
        return shift.reshape(like.shape), raw.reshape(like.shape)

    def _couple(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        x1, x2 = self._split(x)
        shift, raw = self._params(x1, x2)
        log_s = F.logsigmoid(raw) + math.log(self.scale_factor)
        logdet = sum_except_batch(log_s)
        if inverse:
            return self._merge(x1, x2 * torch.exp(-log_s) - shift), -logdet
        return self._merge(x1, (x2 + shift) * torch.exp(log_s)), logdet

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, inverse=True)

    def output_shape(self, shape: Shape) -> Shape:
        if tuple(shape) != (self.num_tokens, self.dim):
            raise ValueError(
                f"JetCoupling was built for ({self.num_tokens}, {self.dim}) tokens, got "
                f"{tuple(shape)}"
            )
        return tuple(shape)


class Jet(Sequential):
    """Jet's flow (arXiv:2412.15129; big_vision jet.py, `Model`): `Patchify` into p x p patch
    tokens, `num_couplings` `JetCoupling`s, and the tokens flattened to the (D,) latent.

    The couplings follow the authors' interleaving: `kinds` ("channels" | "spatial") is cycled
    over the couplings, and each spatial one takes the next pattern of `spatial_splits`, also
    cycled (the ImageNet-64 config: kinds [channels x 4, spatial], splits [checkerboard,
    checkerboard-inv, vstripes, vstripes-inv, hstripes, hstripes-inv]). Channel coupling i draws
    its permutation from seed ``permutation_seed + i``.

    `coupling(N, D, split=..., grid=..., seed=...)` builds each coupling (the `jet_coupling`
    catalogue layer, with its ViT)."""

    def __init__(
        self,
        image_shape: Sequence[int],
        coupling: Callable[..., Bijector],
        patch_size: int = 4,
        num_couplings: int = 8,
        kinds: Sequence[str] = ("channels", "channels", "spatial"),
        spatial_splits: Sequence[str] = ("checkerboard", "checkerboard-inv"),
        permutation_seed: int = 0,
    ):
        image_shape = tuple(int(s) for s in image_shape)
        kinds, spatial_splits = list(kinds), list(spatial_splits)
        if num_couplings < 1:
            raise ValueError(f"num_couplings must be >= 1, got {num_couplings}")
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise ValueError(f"kinds must be a non-empty list of {' | '.join(KINDS)}, got {kinds}")
        bad = [s for s in spatial_splits if s not in SPATIAL_SPLITS]
        if bad or ("spatial" in kinds and not spatial_splits):
            raise ValueError(
                f"spatial_splits must list patterns of {', '.join(SPATIAL_SPLITS)}, got "
                f"{spatial_splits}"
            )
        patchify = Patchify(patch_size, spatial=image_shape[1:])
        num_tokens, dim = patchify.output_shape(image_shape)
        grid = (image_shape[1] // patch_size, image_shape[2] // patch_size)
        layers: list[Bijector] = [patchify]
        spatial = 0
        for i in range(num_couplings):
            if kinds[i % len(kinds)] == "channels":
                split = "channels"
            else:
                split = spatial_splits[spatial % len(spatial_splits)]
                spatial += 1
            layers.append(
                coupling(num_tokens, dim, split=split, grid=grid, seed=permutation_seed + i)
            )
        layers.append(Flatten((num_tokens, dim)))
        super().__init__(layers)
        self.image_shape = image_shape
        self.latent_sizes = [num_tokens * dim]
