"""Flow layers: every class here is a `Bijector` with `forward` and `inverse` returning
``(output, log|det J|)``."""

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.autoregressive import MaskedAffineAutoregressive
from nfcv.flows.base import Bijector, Flatten, Sequential
from nfcv.flows.conv1x1 import InvConv1x1, InvConv1x1LU, Triangular1x1
from nfcv.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    MixLogCDFCoupling,
    SplineCoupling,
)
from nfcv.flows.elementwise import Shift
from nfcv.flows.ffjord import FFJORD
from nfcv.flows.hint import HINTCoupling
from nfcv.flows.linear import DiagAffine, PeriodicConv
from nfcv.flows.multiscale import LearnedPrior, MultiScale, SplitPrior, Squeeze
from nfcv.flows.nets import GlowNet, ZeroConv2d
from nfcv.flows.permute import ChannelPermutation

__all__ = [
    "FFJORD",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijector",
    "ChannelPermutation",
    "DiagAffine",
    "Flatten",
    "GlowNet",
    "HINTCoupling",
    "InvConv1x1",
    "InvConv1x1LU",
    "LearnedPrior",
    "MaskedAffineAutoregressive",
    "MixLogCDFCoupling",
    "MultiScale",
    "PeriodicConv",
    "Sequential",
    "Shift",
    "SplineCoupling",
    "SplitPrior",
    "Squeeze",
    "Triangular1x1",
    "ZeroConv2d",
]
