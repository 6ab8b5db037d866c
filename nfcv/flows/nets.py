"""Coupling networks. Each is a factory ``net(in_channels, out_channels) -> nn.Module`` (configs
pass them with ``_partial_: true``), so any coupling layer works with any network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.base import at_least_float32, no_autocast

# Glow's zero-initialised conv rescales its output by exp(3 * logs): a larger learning rate for the
# per-channel output scale (openai/glow, model.py, conv2d_zeros with logscale_factor=3).
ZERO_CONV_LOGSCALE_FACTOR = 3.0


def float32_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """`conv(x)` with autocast off, in float32 at least: the last layer of a coupling network,
    whose outputs (shifts, scales, spline and mixture parameters) would otherwise be rounded to
    bfloat16's 8 significant bits under mixed precision and move the model's bits per dim by
    hundredths. The rest of the network keeps running in the low precision."""
    with no_autocast(x):
        return conv(at_least_float32(x))


class ZeroConv2d(nn.Module):
    """Conv whose weight, bias and per-channel log-scale start at zero, so it outputs 0 at init.

    Used as the last layer of every coupling network (each coupling starts as the identity) and
    for the learned priors of split levels (Glow, arXiv:1807.03039, section 3.3).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.logs = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def folded(self) -> tuple[Tensor, Tensor]:
        """The weight and bias of the one convolution this layer is: conv(x) * e is the conv
        with weight W * e and bias b * e, the output scale folded into the (small) weights
        instead of a pass over the output."""
        scale = torch.exp(self.logs * ZERO_CONV_LOGSCALE_FACTOR).view(-1)
        return self.conv.weight * scale.view(-1, 1, 1, 1), self.conv.bias * scale

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.folded()
        with no_autocast(x):
            return F.conv2d(at_least_float32(x), weight, bias, padding=self.conv.padding)


class _ActNormAct(nn.Module):
    """ActNorm used as a normaliser inside a network (its log-det is not part of the density)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(x)[0])

    def folded(self, conv: nn.Conv2d, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The weight and bias of ``conv`` followed by this actnorm as one convolution:
        ``(W x + loc) * s = (s W) x + s loc``, so the normalisation costs a rescaling of the
        weights, not two passes over the activations. `x` is the conv's (NCHW) input, needed
        until the actnorm is initialised: on the first training batch the data-dependent init
        runs on it first, outside autograd, so every call takes this same path (gradient
        checkpointing recomputes the network in the backward pass and requires the
        recomputation to save what the first pass saved)."""
        norm = self.norm
        assert conv.bias is None, "the actnorm's loc is the bias"
        if norm.training and not bool(norm.initialized):
            assert x is not None, "the data-dependent init needs the conv's input"
            with torch.no_grad():
                norm.initialize(conv(x))
        scale = torch.exp(norm.log_scale).view(-1)
        return conv.weight * scale.view(-1, 1, 1, 1), norm.loc.view(-1) * scale

    def after_conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``self(conv(x))`` as one convolution (`folded`); the ReLU runs in place on the
        convolution's output (which its backward does not need)."""
        weight, bias = self.folded(conv, x)
        return F.relu_(F.conv2d(x, weight, bias, padding=conv.padding))


# Where GlowNet runs as convolutions on a CPU (bfloat16 autocast, or USE_GEMM off), networks up
# to this width convolve channels-last: oneDNN's kernels for thin convolutions (2 -> 128,
# 128 -> 4 channels) and for 1x1 convolutions at these widths are about twice as fast in NHWC.
# The flow itself stays NCHW; only the network's input and output are converted.
CHANNELS_LAST_MAX_WIDTH = 256


def _channels_last(x: Tensor, width: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and width <= CHANNELS_LAST_MAX_WIDTH


# --- Glow's network as matrix products on a CPU -------------------------------------------------
#
# The network's two thin 3x3 convolutions (c/2 -> width and width -> c channels, c the flow's
# channels) are the slow ones in oneDNN: a few input or output channels leave its kernels at a
# tenth to a half of the machine's matrix-product rate. On a CPU GlowNet instead runs each as one
# matrix product over the batch's pixels:
#
# - thin input: the 3x3 patches of the input (one row per pixel, 9 * c/2 columns) times the
#   (9 c/2, width) weight matrix, giving the hidden maps one row per pixel (channels-last);
# - thin output: a (9 c, width) matrix times the transposed hidden map gives each pixel's
#   contribution to each of its 9 neighbours, taps-major: one row per (tap, channel), pixels
#   along the row. `_col2im_t` sums them as 8 shifted adds of whole channel planes (the adjoint
#   of the patches); its backward takes the taps-major patches of the (c-channel) gradient.
#   Taps-major, each add and copy moves runs of W contiguous values; pixel-major (one row per
#   pixel) they were runs of c, 2 to 48 values, and these passes took 10-15% of a step.
#
# The 1x1 convolution between them is a plain product, and in float32 both ReLU layers are
# oneDNN products that add the bias and apply the ReLU as they write (no bias broadcast, no
# second pass). Patches and their adjoint touch only the thin side (c channels), never the wide
# one. Measured (python -m nfcv.bench, README, Speed): Glow's training step at the paper size
# went from 0.44-0.46 of the matrix-product rate with oneDNN's convolutions to 0.52-0.57 with
# pixel-major products, and to 0.61 taps-major.


def _im2col(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, 9*C): each pixel's 3x3 neighbourhood (zero padding), columns in
    (row offset, column offset, channel) order. The input is copied once into a zero-bordered
    channels-last buffer (the padding and the layout change in one pass), whose patches are
    then one strided view and one copy."""
    n, c, h, w = x.shape
    xp = x.new_zeros(n, h + 2, w + 2, c)
    xp[:, 1 : h + 1, 1 : w + 1] = x.permute(0, 2, 3, 1)
    s = xp.stride()
    patches = xp.as_strided((n, h, w, 3, 3, c), (s[0], s[1], s[2], s[1], s[2], s[3]))
    return patches.reshape(n * h * w, 9 * c)


def _im2col_t(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (9*C, N*H*W): `_im2col` transposed, rows in (row offset, column offset,
    channel) order. Each row is a shifted copy of one channel plane (runs of W contiguous
    values), where `_im2col`'s rows hold runs of C."""
    n, c, h, w = x.shape
    xp = F.pad(x.transpose(0, 1), (1, 1, 1, 1))  # (C, N, H + 2, W + 2)
    s = xp.stride()
    patches = xp.as_strided((3, 3, c, n, h, w), (s[2], s[3], s[0], s[1], s[2], s[3]))
    return patches.reshape(9 * c, n * h * w)


def _col2im_t(rows: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """The adjoint of `_im2col_t`: (9*C, N*H*W) -> (N, C, H, W), each tap's (C, N, H, W) planes
    added back onto the pixels they were read from (tap (i, j) of pixel p onto p + (i-1, j-1)).

    Each shifted window of the output is one `as_strided` (the output is a fresh tensor, offset
    0), where indexing took several view operations: at Glow's small sizes these maps are
    small enough that the number of operations, not the data, sets the time. (The taps are
    sliced as views: an `as_strided` on them would need `storage_offset()`, which
    `torch.compile` cannot trace.)"""
    n, c, h, w = shape
    taps = rows.reshape(9, c, n, h, w).unbind(0)
    out = taps[4].clone()  # the centre tap
    stride = out.stride()
    for i in range(3):
        for j in range(3):
            if (i, j) == (1, 1):
                continue
            di, dj = i - 1, j - 1
            size = (c, n, h - abs(di), w - abs(dj))
            window = out.as_strided(size, stride, max(0, di) * w + max(0, dj))
            window.add_(
                taps[3 * i + j][
                    ..., max(0, -di) : size[2] + max(0, -di), max(0, -dj) : size[3] + max(0, -dj)
                ]
            )
    return out.transpose(0, 1)


def _linear_relu(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``relu(x @ weight.T + bias)``: in float32 one oneDNN matrix product with the bias and the
    ReLU applied as it writes its output (no broadcast copy of the bias, no second pass)."""
    if x.dtype == torch.float32 and _ONEDNN_LINEAR:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu", [], "")
    return torch.relu_(torch.addmm(bias, x, weight.t()))


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


class _GlowNetRows(torch.autograd.Function):
    """Glow's network with its actnorms folded in, as matrix products over the pixels:
    ``conv3x3 -> ReLU -> conv1x1 -> ReLU -> [dropout] -> conv3x3``, (N, C, H, W) -> (N, O, H, W).

    Weights: `w1` (width, 9C) in `_im2col`'s column order, `w2` (width, width), `w3` (width, 9O)
    with flipped taps (`GlowNet._forward_rows`). Saves the patches and the two hidden maps (the
    second after dropout), as autograd would for the layers one by one."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w3, b3, dropout: float):  # noqa: ANN001
        n, c, height, width = x.shape
        cols = _im2col(x)
        h1 = _linear_relu(cols, w1, b1)
        h2 = _linear_relu(h1, w2, b2)
        if dropout > 0:
            # dropout(relu(z)) > 0 exactly where the unit is kept and z > 0: the one mask the
            # backward pass needs, read off the output it saves anyway.
            h2 = F.dropout(h2, dropout, training=True)
        ctx.save_for_backward(cols, h1, h2, w1, w2, w3)
        ctx.shape, ctx.dropout = (n, height, width, c), dropout
        # The thin output conv taps-major: (9 O, width) x (width, M), whose rows `_col2im_t` adds
        # back as shifted channel planes.
        out = _col2im_t(w3.t().mm(h2.t()), (n, w3.shape[1] // 9, height, width))
        return out.add_(b3.view(-1, 1, 1)).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable  # its products run outside autograd
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        cols, h1, h2, w1, w2, w3 = ctx.saved_tensors
        n, height, width, c = ctx.shape
        keep = 1.0 / (1.0 - ctx.dropout)  # dropout's rescaling of the kept units
        grad_rows = _im2col_t(grad)  # (9 O, M): the adjoint of the forward's _col2im_t
        grad_w3 = grad_rows.mm(h2).t()
        grad_b3 = grad.sum((0, 2, 3))
        dh = grad_rows.t().mm(w3.t() * keep)
        # The ReLUs' backward in place (into the product just made, which nothing else reads),
        # and the bias gradients as matrix-vector products with ones (a column sum that reads
        # the map once, about twice as fast as sum(0) here; FlopCounterMode does not count mv,
        # so the model's FLOPs stay those of its convolutions).
        dz = torch.ops.aten.threshold_backward.grad_input(dh, h2, 0, grad_input=dh)
        ones = dz.new_ones(dz.shape[0])
        grad_w2, grad_b2 = dz.t().mm(h1), dz.t().mv(ones)
        dh = dz.mm(w2)
        dz = torch.ops.aten.threshold_backward.grad_input(dh, h1, 0, grad_input=dh)
        # (9C, M) x (M, width), transposed after: 1.5-2x the rate of dz^T x cols for these
        # thin shapes (MKL, measured at 18-108 columns).
        grad_w1 = cols.t().mm(dz).t()
        grad_b1 = dz.t().mv(ones)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _col2im_t(w1.t().mm(dz.t()), (n, c, height, width))
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_w3, grad_b3, None


def _gemm_path(x: Tensor) -> bool:
    """Whether GlowNet runs as matrix products (`_GlowNetRows`): on a CPU, in float32 or
    float64, outside autocast (whose bfloat16 rules the convolution path keeps)."""
    return (
        USE_GEMM
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )


# GlowNet's matrix-product path on a CPU (see above). False: the convolution path everywhere.
USE_GEMM = True


class GlowNet(nn.Module):
    """Glow's coupling network NN(): conv3x3 -> actnorm -> ReLU -> conv1x1 -> actnorm -> ReLU ->
    zero-init conv3x3 (arXiv:1807.03039, section 3.3 and appendix; convs carry no bias because
    ActNorm follows them)."""

    def __init__(
        self, in_channels: int, out_channels: int, hidden_channels: int = 512, dropout: float = 0.0
    ):
        super().__init__()
        if hidden_channels < 1:
            raise ValueError(f"hidden_channels must be positive, got {hidden_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            _ActNormAct(hidden_channels),
            nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False),
            _ActNormAct(hidden_channels),
            # Not in Glow; a regulariser for small datasets (Flow++ uses dropout in its nets).
            # Active in training only, so the flow is exactly invertible in eval mode.
            nn.Dropout(dropout),
            ZeroConv2d(hidden_channels, out_channels, 3),
        )
        nn.init.normal_(self.net[0].weight, std=0.05)
        nn.init.normal_(self.net[2].weight, std=0.05)

    def forward(self, x: Tensor) -> Tensor:
        if _gemm_path(x):
            return self._forward_rows(x)
        return self._forward_convs(x)

    def _forward_convs(self, x: Tensor) -> Tensor:
        conv1, norm1, conv2, norm2, dropout, conv_out = self.net
        nhwc = _channels_last(x, conv2.out_channels)
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        h = norm1.after_conv(conv1, x)
        h = norm2.after_conv(conv2, h)
        if dropout.p > 0:
            h = dropout(h)
        out = conv_out(h)
        return out.contiguous() if nhwc else out

    def _forward_rows(self, x: Tensor) -> Tensor:
        """`forward` on a CPU: `_GlowNetRows`, the convolutions as matrix products over the
        pixels, with the same weights."""
        conv1, norm1, conv2, norm2, dropout, conv_out = self.net
        if self.training and not (bool(norm1.norm.initialized) and bool(norm2.norm.initialized)):
            with torch.no_grad():  # the actnorms' data-dependent init, on the first batch
                norm2.folded(conv2, norm1.after_conv(conv1, x))
        w1, b1 = norm1.folded(conv1)
        w2, b2 = norm2.folded(conv2)
        w3, b3 = conv_out.folded()
        return _GlowNetRows.apply(
            x,
            w1.permute(0, 2, 3, 1).flatten(1),  # (width, 3, 3, C): im2col's column order
            b1,
            w2.flatten(1),
            b2,
            # column (i, j, o) holds w3[o, :, 2-i, 2-j]: the product for tap (i, j) at pixel p
            # lands on pixel p + (i-1, j-1) (_col2im_t)
            w3.flip(2, 3).permute(1, 2, 3, 0).flatten(1),
            b3,
            dropout.p if dropout.training else 0.0,
        )


class ResNetNet(nn.Module):
    """RealNVP's coupling network (Dinh et al. 2016, arXiv:1605.08803, section 4.1): a 3x3 conv,
    `num_blocks` pre-activation residual blocks (batch norm -> ReLU -> 3x3 conv, twice), batch
    norm -> ReLU, and a zero-initialised 3x3 output conv. Convs are weight-normalised (Salimans &
    Kingma 2016) as in the paper; batch norm uses batch statistics in training and running
    averages in evaluation, so the flow is deterministic (and exactly invertible) in eval mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 64,
        num_blocks: int = 8,
    ):
        super().__init__()
        if hidden_channels < 1 or num_blocks < 0:
            raise ValueError(
                f"need hidden_channels >= 1 and num_blocks >= 0, got {hidden_channels}, "
                f"{num_blocks}"
            )

        def conv(c_in: int, c_out: int) -> nn.Module:
            return weight_norm(nn.Conv2d(c_in, c_out, 3, padding=1))

        self.conv_in = conv(in_channels, hidden_channels)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(),
                conv(hidden_channels, hidden_channels),
                nn.BatchNorm2d(hidden_channels),
                nn.ReLU(),
                conv(hidden_channels, hidden_channels),
            )
            for _ in range(num_blocks)
        )
        self.norm_out = nn.BatchNorm2d(hidden_channels)
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = h + block(h)
        return float32_conv(self.conv_out, F.relu(self.norm_out(h)))


class MLP(nn.Module):
    """NICE's coupling function m (Dinh et al. 2014, arXiv:1410.8516, section 5.1): `num_layers`
    hidden ReLU layers of `hidden` units; the output layer starts at zero, so every coupling
    starts as the identity. Takes and returns ``(B, features)``."""

    def __init__(
        self, in_features: int, out_features: int, hidden: int = 1000, num_layers: int = 5
    ):
        super().__init__()
        if hidden < 1 or num_layers < 1:
            raise ValueError(f"need hidden >= 1 and num_layers >= 1, got {hidden}, {num_layers}")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        out = nn.Linear(width, out_features)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def concat_elu(x: Tensor) -> Tensor:
    """``elu([x, -x])`` along channels (PixelCNN++'s nonlinearity, used throughout Flow++)."""
    return F.elu(torch.cat([x, -x], dim=1))


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channels of each position of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    """Flow++'s gated residual conv block: ``x + a * sigmoid(b)`` with ``[a, b] =
    conv2(dropout(concat_elu(conv1(concat_elu(x)) [+ 1x1(concat_elu(context))])))``
    (arXiv:1902.00275, section 3.3). `conv2` is 1x1 (`nin=True`) or 3x3."""

    def __init__(
        self, channels: int, context_channels: int = 0, dropout: float = 0.0, nin: bool = True
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.context = (
            nn.Conv2d(2 * context_channels, channels, 1) if context_channels > 0 else None
        )
        self.dropout = nn.Dropout(dropout)
        self.conv2 = (
            nn.Conv2d(2 * channels, 2 * channels, 1)
            if nin
            else nn.Conv2d(2 * channels, 2 * channels, 3, padding=1)
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.conv1(concat_elu(x))
        if self.context is not None:
            if context is None:
                raise ValueError("this block was built with context channels: pass a context")
            h = h + self.context(concat_elu(context))
        a, b = self.conv2(self.dropout(concat_elu(h))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class GatedAttention(nn.Module):
    """Flow++'s gated multi-head self-attention over all positions, with a learned position
    embedding added to its input: ``x + a * sigmoid(b)``, ``[a, b] = 1x1(dropout(MHA(x + pos)))``
    (arXiv:1902.00275, section 3.3; the position embedding is shared by the blocks of one
    network)."""

    def __init__(self, channels: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels ({channels}) must be divisible by heads ({heads})")
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Conv2d(channels, 2 * channels, 1)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x + pos).view(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, T, C / heads)
        att = F.scaled_dot_product_attention(q, k, v)
        att = att.transpose(-1, -2).reshape(b, c, h, w)
        a, g = self.out(self.dropout(att)).chunk(2, dim=1)
        return x + a * torch.sigmoid(g)


class FlowppNet(nn.Module):
    """Flow++'s coupling network (arXiv:1902.00275, section 3.3; aravindsrinivas/flowpp):
    3x3 conv in, `num_blocks` x (gated conv, layer norm, gated self-attention, layer norm), and a
    zero-initialised 3x3 conv out. `spatial` (H, W) sizes the learned position embedding; the
    coupling that owns the network passes it. `context_channels > 0` feeds a conditioning map
    into every gated conv (the variational dequantization flow); call ``net(x, context)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial: tuple[int, int] | list[int],
        hidden_channels: int = 96,
        num_blocks: int = 10,
        heads: int = 4,
        dropout: float = 0.0,
        attention: bool = True,
        context_channels: int = 0,
    ):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        h, w = (int(s) for s in spatial)
        self.attention = attention
        self.pos = (
            nn.Parameter(0.01 * torch.randn(1, hidden_channels, h, w)) if attention else None
        )
        self.conv_in = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.convs = nn.ModuleList(
            GatedConv(hidden_channels, context_channels, dropout) for _ in range(num_blocks)
        )
        self.norms1 = nn.ModuleList(ChannelLayerNorm(hidden_channels) for _ in range(num_blocks))
        self.attns = nn.ModuleList(
            GatedAttention(hidden_channels, heads, dropout) if attention else nn.Identity()
            for _ in range(num_blocks)
        )
        self.norms2 = nn.ModuleList(
            ChannelLayerNorm(hidden_channels) if attention else nn.Identity()
            for _ in range(num_blocks)
        )
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.conv_in(x)
        for conv, norm1, attn, norm2 in zip(
            self.convs, self.norms1, self.attns, self.norms2, strict=True
        ):
            h = norm1(conv(h, context))
            if self.attention:
                h = norm2(attn(h, self.pos))
        return float32_conv(self.conv_out, h)
