"""Coupling networks. Each is a factory ``net(in_channels, out_channels) -> nn.Module`` (configs
pass them with ``_partial_: true``), so any coupling layer works with any network."""

from nfcv.flows.nets.common import ZERO_CONV_LOGSCALE_FACTOR, ZeroConv2d, float32_conv
from nfcv.flows.nets.flowpp import (
    ChannelLayerNorm,
    FlowppNet,
    GatedAttention,
    GatedConv,
    concat_elu,
)
from nfcv.flows.nets.glow import GlowNet
from nfcv.flows.nets.mlp import MLP
from nfcv.flows.nets.resnet import ResNetNet

__all__ = [
    "MLP",
    "ZERO_CONV_LOGSCALE_FACTOR",
    "ChannelLayerNorm",
    "FlowppNet",
    "GatedAttention",
    "GatedConv",
    "GlowNet",
    "ResNetNet",
    "ZeroConv2d",
    "concat_elu",
    "float32_conv",
]
