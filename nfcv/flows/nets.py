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

    def forward(self, x: Tensor) -> Tensor:
        # conv(x) * e = conv with weight W * e and bias b * e: the output scale folded into the
        # (small) weights instead of a pass over the output.
        scale = torch.exp(self.logs * ZERO_CONV_LOGSCALE_FACTOR).view(-1)
        with no_autocast(x):
            return F.conv2d(
                at_least_float32(x),
                self.conv.weight * scale[:, None, None, None],
                self.conv.bias * scale,
                padding=self.conv.padding,
            )


class _ActNormAct(nn.Module):
    """ActNorm used as a normaliser inside a network (its log-det is not part of the density)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = ActNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm(x)[0])

    def after_conv(self, conv: nn.Conv2d, x: Tensor) -> Tensor:
        """``self(conv(x))`` as one convolution: ``(W x + loc) * s = (s W) x + s loc``, so the
        normalisation costs a rescaling of the weights, not two passes over the activations;
        the ReLU runs in place on the convolution's output (which its backward does not need).
        On the first training batch the data-dependent init runs first, outside autograd, so
        every call takes this same path (gradient checkpointing recomputes the network in the
        backward pass and requires the recomputation to save what the first pass saved)."""
        norm = self.norm
        assert conv.bias is None, "the actnorm's loc is the bias"
        if norm.training and not bool(norm.initialized):
            with torch.no_grad():
                norm.initialize(conv(x))
        scale = torch.exp(norm.log_scale).view(-1)
        weight = conv.weight * scale[:, None, None, None]
        bias = norm.loc.view(-1) * scale
        return F.relu_(F.conv2d(x, weight, bias, padding=conv.padding))


# Coupling networks up to this width run their convolutions channels-last on a CPU: oneDNN's
# kernels for thin convolutions (2 -> 128, 128 -> 4 channels) and for 1x1 convolutions at these
# widths are about twice as fast in NHWC (python -m nfcv.bench, cpu-small: see README, Speed);
# at width 512 NCHW was faster. The flow itself stays NCHW; only the network's input and
# output are converted (a few channels each).
CHANNELS_LAST_MAX_WIDTH = 256


def _channels_last(x: Tensor, width: int) -> bool:
    return x.device.type == "cpu" and x.dim() == 4 and width <= CHANNELS_LAST_MAX_WIDTH


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
