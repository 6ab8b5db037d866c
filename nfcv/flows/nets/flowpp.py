"""Flow++'s coupling network: gated convolutions and self-attention (Ho et al. 2019,
arXiv:1902.00275)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.nets.common import float32_conv


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
