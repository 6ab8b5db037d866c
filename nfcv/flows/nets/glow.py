"""Glow's coupling network (Kingma & Dhariwal 2018, arXiv:1807.03039)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.nets.common import ZeroConv2d


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
        if norm.needs_init():
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
        h = norm1.after_conv(conv1, x)
        h = norm2.after_conv(conv2, h)
        if dropout.p > 0:
            h = dropout(h)
        return conv_out(h)
