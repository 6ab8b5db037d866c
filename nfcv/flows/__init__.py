"""Flow layers: every class here is a `Bijector` with `forward` and `inverse` returning
``(output, log|det J|)``."""

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.autoregressive import MaskedAffineAutoregressive
from nfcv.flows.base import Bijector, Flatten, Sequential
from nfcv.flows.conv1x1 import BlockInvConv1x1, InvConv1x1, InvConv1x1LU, Triangular1x1
from nfcv.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    MixLogCDFCoupling,
    NAFCoupling,
    SplineCoupling,
)
from nfcv.flows.elementwise import LogisticToNormal, Logit, Shift, Sigmoid
from nfcv.flows.ffjord import FFJORD
from nfcv.flows.hint import HINTCoupling
from nfcv.flows.jet import Jet, JetCoupling, JetViT
from nfcv.flows.linear import DiagAffine, EmergingConv, FullLinear, PeriodicConv
from nfcv.flows.multiscale import (
    ColumnMerge,
    ColumnSplit,
    LearnedPrior,
    Levels,
    MultiScale,
    SplitPrior,
    Squeeze,
    SwapHalves,
)
from nfcv.flows.nets import MLP, FlowppNet, GlowNet, ResNetNet, ZeroConv2d
from nfcv.flows.patch import Patchify
from nfcv.flows.permute import ChannelPermutation
from nfcv.flows.presets import NICE, FlowPP, RealNVP, VectorAdditiveCoupling, VectorScale
from nfcv.flows.residual import LipSwish, ResidualBlock, ResidualFlow, SpectralNormConv2d
from nfcv.flows.tarflow import TarFlow, TarFlowBlock, TarFlowNet

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijector",
    "BlockInvConv1x1",
    "ChannelPermutation",
    "ColumnMerge",
    "ColumnSplit",
    "DiagAffine",
    "EmergingConv",
    "FFJORD",
    "Flatten",
    "FlowPP",
    "FlowppNet",
    "FullLinear",
    "GlowNet",
    "HINTCoupling",
    "InvConv1x1",
    "InvConv1x1LU",
    "Jet",
    "JetCoupling",
    "JetViT",
    "LearnedPrior",
    "LipSwish",
    "Levels",
    "LogisticToNormal",
    "Logit",
    "MLP",
    "MaskedAffineAutoregressive",
    "MixLogCDFCoupling",
    "MultiScale",
    "NAFCoupling",
    "NICE",
    "Patchify",
    "PeriodicConv",
    "RealNVP",
    "ResNetNet",
    "ResidualBlock",
    "ResidualFlow",
    "Sequential",
    "Shift",
    "Sigmoid",
    "SpectralNormConv2d",
    "SplineCoupling",
    "SplitPrior",
    "Squeeze",
    "SwapHalves",
    "TarFlow",
    "TarFlowBlock",
    "TarFlowNet",
    "Triangular1x1",
    "VectorAdditiveCoupling",
    "VectorScale",
    "ZeroConv2d",
]
