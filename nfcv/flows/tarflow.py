"""TarFlow (Zhai et al. 2024, "Normalizing Flows are Capable Generative Models",
arXiv:2412.06329; the authors' code: apple/ml-tarflow, ``transformer_flow.py``).

A `TarFlowBlock` is a masked autoregressive affine flow over a sequence of N tokens of D values
(what `Patchify` outputs) whose conditioner is a causal transformer: token i is mapped to
``z_i = (x_i - b_i) * exp(-a_i)`` with ``(a_i, b_i)`` computed from tokens ``0..i-1`` (the
transformer's output at position i - 1; token 0 gets ``a = b = 0``). `TarFlow` is the whole
model: Patchify, T blocks whose token order flips from one block to the next, and a Flatten.

Differences from the reference, on purpose: the log-determinant is the exact per-sample sum
``-sum a`` (the reference returns ``-mean a``, a per-dimension loss scale); the projection out
starts at zero in its weight *and* bias (the reference zeroes the weight only), so every block
starts as the identity; the null class of classifier-free guidance is a learned embedding of its
own (the reference uses the mean of the class embeddings); the position embedding is indexed in
the block's own token order (the reference flips it with the tokens: the same family of maps).

Sampling inverts one token at a time. With the key/value cache (the default) each step runs the
transformer on the one new token and attends over the cached keys and values of the tokens
before it: N steps of O(1) tokens; without it, each step reruns the block on the whole prefix.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from nfcv.flows.base import Bijector, Flatten, Shape, at_least_float32, no_autocast
from nfcv.flows.patch import Patchify


@dataclass(frozen=True)
class Guidance:
    """Guided sampling (TarFlow, section 2.6; ``reverse(..., guidance, attn_temp,
    annealed_guidance)`` in the reference code).

    Each token's ``(a, b)`` is pushed away from an unguided prediction ``(a_u, b_u)``:
    ``a + w (a - a_u)`` (and the same for b), with ``w = scale``, or with `annealed`
    ``w = scale * (i + 1) / (N - 1)`` for the parameters of token i + 1 (guidance grows over the
    tokens). The unguided prediction is the null class (classifier-free guidance) for a
    class-conditional model, at attention temperature `attn_temp`; for an unconditional model it
    is the model itself at attention temperature `attn_temp`, which must then differ from 1.
    ``scale = 0`` is plain sampling.
    """

    scale: float = 0.0
    annealed: bool = False
    attn_temp: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.scale}")
        if not (math.isfinite(self.attn_temp) and self.attn_temp > 0):
            raise ValueError(f"attn_temp must be a finite number > 0, got {self.attn_temp}")


class KVCache:
    """The keys and values of the tokens seen so far, for one attention layer: (B, heads, t,
    head_dim) each. Without autograd they are written into buffers sized for all `num_tokens`
    at once (no copy of the past per step); with autograd (a gradient through the inverse) they
    are concatenated, so that no tensor an earlier step read is overwritten."""

    def __init__(self, num_tokens: int):
        self.num_tokens, self.length = num_tokens, 0
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.parts: tuple[list[Tensor], list[Tensor]] = ([], [])

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        t = self.length
        self.length += k.shape[2]
        if torch.is_grad_enabled():
            self.parts[0].append(k)
            self.parts[1].append(v)
            return torch.cat(self.parts[0], dim=2), torch.cat(self.parts[1], dim=2)
        if self.keys is None:
            b, heads, _, d = k.shape
            self.keys = k.new_empty(b, heads, self.num_tokens, d)
            self.values = v.new_empty(b, heads, self.num_tokens, d)
        self.keys[:, :, t : self.length] = k
        self.values[:, :, t : self.length] = v
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]


class TransformerLayer(nn.Module):
    """A pre-LayerNorm transformer layer: ``h + attn(LN(h))``, then ``h + mlp(LN(h))``, with
    causal multi-head self-attention through `scaled_dot_product_attention` (flash kernels on a
    GPU) and a GELU MLP of `expansion` x `width` units (the reference's ``AttentionBlock``)."""

    def __init__(self, width: int, head_dim: int, expansion: int = 4):
        super().__init__()
        self.heads = width // head_dim
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attn_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, expansion * width), nn.GELU(), nn.Linear(expansion * width, width)
        )

    def qkv_heads(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of tokens `h` (B, T, W), each (B, heads, T, head_dim)."""
        b, t, _ = h.shape
        qkv = self.qkv(self.attn_norm(h)).reshape(b, t, 3, self.heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        return q, k, v

    def finish(self, h: Tensor, attended: Tensor) -> Tensor:
        b, _, t, _ = attended.shape
        h = h + self.attn_out(attended.transpose(1, 2).reshape(b, t, -1))
        return h + self.mlp(self.mlp_norm(h))

    def forward(self, h: Tensor, q_scale: Tensor | None = None) -> Tensor:
        """Every position at once, causally masked. `q_scale` (B, 1, 1, 1): 1 / the attention
        temperature of each sample (None: 1)."""
        q, k, v = self.qkv_heads(h)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        return self.finish(h, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, h: Tensor, cache: KVCache, q_scale: Tensor | None = None) -> Tensor:
        """One new token `h` (B, 1, W) attending over itself and the tokens before it, whose keys
        and values are in `cache` (appended to here)."""
        q, k, v = self.qkv_heads(h)
        keys, values = cache.append(k, v)
        if q_scale is not None:
            q = q * q_scale.to(q.dtype)
        return self.finish(h, F.scaled_dot_product_attention(q, keys, values))


class TarFlowNet(nn.Module):
    """The conditioner of a `TarFlowBlock` up to its last hidden layer: a linear projection of
    each token to `width`, a learned position embedding, a class embedding (with a null class at
    index `num_classes`) for a class-conditional block, and `layers` causal transformer layers."""

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        width: int,
        layers: int,
        head_dim: int,
        expansion: int,
        num_classes: int | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.proj_in = nn.Linear(token_dim, width)
        self.pos_embed = nn.Parameter(torch.randn(num_tokens, width) * 1e-2)
        self.class_embed = None
        if num_classes:
            self.class_embed = nn.Parameter(torch.randn(num_classes + 1, width) * 1e-2)
        self.layers = nn.ModuleList(
            TransformerLayer(width, head_dim, expansion) for _ in range(layers)
        )

    def embed(self, x: Tensor, start: int, labels: Tensor | None) -> Tensor:
        """Tokens `x` (B, T, D) at positions ``start..start + T - 1`` -> (B, T, width)."""
        h = self.proj_in(x) + self.pos_embed[start : start + x.shape[1]].to(x.dtype)
        if self.class_embed is not None:
            h = h + self.class_embed[class_index(labels, self.num_classes, x)].unsqueeze(1)
        return h

    def forward(self, x: Tensor, labels: Tensor | None = None, q_scale: Tensor | None = None):
        h = self.embed(x, 0, labels)
        for layer in self.layers:
            h = layer(h, q_scale)
        return h

    def step(
        self,
        x: Tensor,
        i: int,
        caches: list[KVCache],
        labels: Tensor | None = None,
        q_scale: Tensor | None = None,
    ) -> Tensor:
        """The hidden state at position i from token i (B, 1, D) and the cached keys and values
        of the tokens before it (`caches`: one per layer)."""
        h = self.embed(x, i, labels)
        for layer, cache in zip(self.layers, caches, strict=True):
            h = layer.step(h, cache, q_scale)
        return h


def class_index(labels: Tensor | None, num_classes: int, like: Tensor) -> Tensor:
    """Rows of the class embedding: the label, or the null class `num_classes` where the label
    is negative (a dropped label, as the reference marks them) or where there is no label."""
    if labels is None:
        return torch.full((like.shape[0],), num_classes, dtype=torch.long, device=like.device)
    labels = torch.as_tensor(labels, device=like.device).long().reshape(-1)
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


class TarFlowBlock(Bijector):
    """One TarFlow autoregressive flow over tokens ``(N, D)`` (the reference's ``MetaBlock``).

    ``z_i = (x_i - b_i) * exp(-a_i)``, ``(a_i, b_i)`` from the causal transformer's output at
    position i - 1 through a zero-initialised linear map (token 0: ``a = b = 0``); log-det
    ``-sum_i a_i``, per sample. With `flip` the block works on the tokens in reverse order
    (TarFlow alternates the direction from block to block). `context`: class labels (B,) for a
    class-conditional block (``num_classes``; a negative label or no context is the null class),
    ignored otherwise.

    `inverse` goes token by token; ``cache=False`` (or ``self.kv_cache = False``) reruns the
    block on the whole prefix at each step instead of reusing keys and values: the same result,
    for tests and benchmarks. ``guidance=Guidance(...)`` guides sampling (see `Guidance`).

    Cost: forward one transformer pass over N tokens, O(N^2 width + N width^2) per layer;
    log-det O(N D); inverse N - 1 steps of one token each with the cache (O(N) attention per
    step), N - 1 passes over prefixes without.
    """

    def __init__(
        self,
        num_tokens: int,
        token_dim: int,
        width: int = 64,
        layers: int = 2,
        head_dim: int = 32,
        expansion: int = 4,
        flip: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        for key, value in (
            ("num_tokens", num_tokens),
            ("token_dim", token_dim),
            ("width", width),
            ("layers", layers),
            ("head_dim", head_dim),
            ("expansion", expansion),
        ):
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"TarFlowBlock: {key} must be an integer >= 1, got {value!r}")
        if int(width) % int(head_dim):
            raise ValueError(
                f"width {width} is not a multiple of head_dim {head_dim} (the width is split "
                f"into heads of head_dim channels): choose a width that head_dim divides, e.g. "
                f"{max(1, round(width / head_dim)) * head_dim}, or a head_dim that divides {width}"
            )
        if num_classes is not None and int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1 or null, got {num_classes}")
        self.num_tokens, self.token_dim = int(num_tokens), int(token_dim)
        self.flip = bool(flip)
        self.num_classes = int(num_classes) if num_classes else None
        self.net = TarFlowNet(
            self.num_tokens,
            self.token_dim,
            int(width),
            int(layers),
            int(head_dim),
            int(expansion),
            self.num_classes,
        )
        self.proj_out = nn.Linear(int(width), 2 * self.token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.checkpoint_grads = False
        self.kv_cache = True

    def output_shape(self, shape: Shape) -> Shape:
        if tuple(int(s) for s in shape) != (self.num_tokens, self.token_dim):
            raise ValueError(
                f"TarFlowBlock was built for (N={self.num_tokens}, D={self.token_dim}) tokens, "
                f"got {tuple(shape)}"
            )
        return tuple(shape)

    def _shift_scale(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``(a, b)`` from hidden states: the last layer in float32 (at least), autocast off."""
        with no_autocast(h):
            a, b = self.proj_out(at_least_float32(h)).chunk(2, dim=-1)
        return a, b

    def _hidden(self, x: Tensor, labels: Tensor | None) -> Tensor:
        if self.checkpoint_grads and torch.is_grad_enabled() and self.training:
            return checkpoint(self.net, x, labels, use_reentrant=False)
        return self.net(x, labels)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        labels = context if self.num_classes else None
        if self.flip:
            x = x.flip(1)
        a, b = self._shift_scale(self._hidden(x, labels))
        # Position i predicts token i + 1: shift by one, token 0 gets a = b = 0.
        a = torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], dim=1)
        b = torch.cat([torch.zeros_like(b[:, :1]), b[:, :-1]], dim=1)
        z = (at_least_float32(x) - b) * torch.exp(-a)
        logdet = -a.reshape(a.shape[0], -1).sum(1)
        return (z.flip(1) if self.flip else z), logdet

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        cache: bool | None = None,
        guidance: Guidance | None = None,
    ) -> tuple[Tensor, Tensor]:
        cache = self.kv_cache if cache is None else bool(cache)
        labels = context if self.num_classes else None
        # Guidance(0) still runs both streams (with weight 0): the same samples as without it.
        guided = guidance is not None
        if guided and guidance.scale > 0 and not self.num_classes and guidance.attn_temp == 1.0:
            raise ValueError(
                "guidance on an unconditional TarFlow is attention-temperature guidance: give an "
                "attention temperature other than 1 (attn_temp=1.5 or 0.5, say)"
            )
        if self.flip:
            z = z.flip(1)
        bsz, n, _ = z.shape
        q_scale = None
        if guided:
            # Two streams in one batch: the guided one, then the unguided one (the null class
            # for a class-conditional block) at attention temperature attn_temp.
            if self.num_classes:
                null = torch.full((bsz,), -1, dtype=torch.long, device=z.device)
                cond = null if labels is None else class_index(labels, self.num_classes, z)
                labels = torch.cat([cond, null])
            ones = z.new_ones(bsz, 1, 1, 1)
            q_scale = torch.cat([ones, ones / guidance.attn_temp])
        caches = [KVCache(n) for _ in self.net.layers]
        tokens = [at_least_float32(z[:, 0])]
        logdet = z.new_zeros(bsz, dtype=tokens[0].dtype)
        for i in range(n - 1):
            if cache:
                x_in = tokens[-1].unsqueeze(1)
                if guided:
                    x_in = torch.cat([x_in, x_in])
                h = self.net.step(x_in, i, caches, labels, q_scale)
            else:
                x_in = torch.stack(tokens, dim=1)
                if guided:
                    x_in = torch.cat([x_in, x_in])
                h = self.net(x_in, labels, q_scale)[:, -1:]
            a, b = self._shift_scale(h)
            a, b = a[:, 0], b[:, 0]
            if guided:
                w = guidance.scale * ((i + 1) / (n - 1) if guidance.annealed else 1.0)
                (a, a_u), (b, b_u) = a.chunk(2), b.chunk(2)
                a, b = a + w * (a - a_u), b + w * (b - b_u)
            tokens.append(z[:, i + 1] * torch.exp(a) + b)
            logdet = logdet + a.sum(1)
        x = torch.stack(tokens, dim=1)
        return (x.flip(1) if self.flip else x), logdet


class TarFlow(Bijector):
    """The TarFlow model's bijection: ``(C, H, W) -> (N * D,)`` through `Patchify` (patch p),
    `num_blocks` `TarFlowBlock`s (every second one on the reversed token order) and a flatten.

    `block`: a factory ``block(N, D, flip=..., num_classes=...)`` (a partial `TarFlowBlock`).
    With `num_classes` (and `conditional` not false) the model is class-conditional: `context`
    is the (B,) labels (none: the null class), and in training each label is replaced by the
    null class with probability `label_dropout`, so that the same model also learns p(x) for
    classifier-free guidance.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        patch_size: int,
        num_blocks: int,
        block: Callable[..., TarFlowBlock],
        num_classes: int | None = None,
        label_dropout: float = 0.0,
        conditional: bool | None = None,
    ):
        super().__init__()
        if conditional is not None and not conditional:
            num_classes = None  # model.num_classes may be set while model.conditional is off
        image_shape = tuple(int(s) for s in image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if isinstance(num_blocks, bool) or int(num_blocks) < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not 0.0 <= float(label_dropout) < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.image_shape = image_shape
        self.patchify = Patchify(patch_size, spatial=image_shape[1:])
        n, d = self.patchify.output_shape(image_shape)
        self.num_classes = int(num_classes) if num_classes else None
        self.label_dropout = float(label_dropout)
        self.blocks = nn.ModuleList(
            block(n, d, flip=bool(i % 2), num_classes=self.num_classes)
            for i in range(int(num_blocks))
        )
        self.flatten = Flatten((n, d))

    @property
    def label_conditional(self) -> bool:
        """Whether the bijection itself reads class labels (through `context`)."""
        return self.num_classes is not None

    def _labels(
        self, context: Tensor | None, batch: int, device, drop: bool = False
    ) -> Tensor | None:
        if self.num_classes is None:
            return None
        if context is None:
            return torch.full((batch,), -1, dtype=torch.long, device=device)
        labels = torch.as_tensor(context, device=device).long().reshape(-1)
        if drop and self.label_dropout > 0:
            drop = torch.rand(batch, device=device) < self.label_dropout
            labels = torch.where(drop, torch.full_like(labels, -1), labels)
        return labels

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        labels = self._labels(context, x.shape[0], x.device, drop=self.training)
        h, total = self.patchify(x)
        for block in self.blocks:
            h, logdet = block(h, labels)
            total = total + logdet
        return self.flatten(h)[0], total

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        *,
        cache: bool | None = None,
        guidance: Guidance | None = None,
    ) -> tuple[Tensor, Tensor]:
        labels = self._labels(context, z.shape[0], z.device)
        h, total = self.flatten.inverse(z)
        for block in reversed(self.blocks):
            h, logdet = block.inverse(h, labels, cache=cache, guidance=guidance)
            total = total + logdet
        return self.patchify.inverse(h)[0], total

    def output_shape(self, shape: Shape) -> Shape:
        shape = self.patchify.output_shape(shape)
        for block in self.blocks:
            shape = block.output_shape(shape)
        return self.flatten.output_shape(shape)
