"""Flow layers: every class here is a `Bijector` with `forward` and `inverse` returning
``(output, log|det J|)``."""

from nfcv.flows.actnorm import ActNorm
from nfcv.flows.base import Bijector, Flatten, Sequential
from nfcv.flows.conv1x1 import InvConv1x1, InvConv1x1LU
from nfcv.flows.coupling import AdditiveCoupling, AffineCoupling
from nfcv.flows.elementwise import Shift
from nfcv.flows.multiscale import LearnedPrior, MultiScale, SplitPrior, Squeeze
from nfcv.flows.nets import GlowNet, ZeroConv2d

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "Bijector",
    "Flatten",
    "GlowNet",
    "InvConv1x1",
    "InvConv1x1LU",
    "LearnedPrior",
    "MultiScale",
    "Sequential",
    "Shift",
    "SplitPrior",
    "Squeeze",
    "ZeroConv2d",
]
