"""Elementwise bijections: preprocessing (Glow's shift, RealNVP's and Flow++'s logit), the
sigmoid that ends the variational dequantization flow, and NICE's logistic prior expressed as a
map onto the standard normal."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nfcv.flows.base import Bijector, sum_except_batch, zero_logdet

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class Shift(Bijector):
    """``z = x + offset``; Glow maps [0, 1] images to [-0.5, 0.5] with offset -0.5 (log-det 0)."""

    def __init__(self, offset: float = -0.5):
        super().__init__()
        self.offset = float(offset)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x + self.offset, zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return z - self.offset, zero_logdet(z)


class Logit(Bijector):
    """``z = logit(alpha + (1 - 2 alpha) x)`` for x in [0, 1] (RealNVP, arXiv:1605.08803,
    section 4.1, alpha = 0.05; Flow++'s `ImgProc` is the same map), with its log-det
    ``sum log(1 - 2 alpha) - log p - log(1 - p)``, ``p = alpha + (1 - 2 alpha) x``. The margin
    alpha keeps the logit away from the infinities at 0 and 1."""

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x
        z = torch.log(p) - torch.log1p(-p)
        # log p + log(1 - p) = -softplus(z) - softplus(-z), stable for any z.
        logdet = math.log1p(-2.0 * self.alpha) + F.softplus(z) + F.softplus(-z)
        return z, sum_except_batch(logdet)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = (torch.sigmoid(z) - self.alpha) / (1.0 - 2.0 * self.alpha)
        logdet = math.log1p(-2.0 * self.alpha) + F.softplus(z) + F.softplus(-z)
        return x, -sum_except_batch(logdet)


class Sigmoid(Bijector):
    """``z = sigmoid(x)``, log-det ``sum log sigmoid(x) + log sigmoid(-x)``."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), sum_except_batch(F.logsigmoid(x) + F.logsigmoid(-x))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = torch.log(z) - torch.log1p(-z)
        return x, -sum_except_batch(F.logsigmoid(x) + F.logsigmoid(-x))


class LogisticToNormal(Bijector):
    """Maps a standard logistic variable onto a standard normal one: ``eps = Phi^-1(sigmoid(x))``.

    Appending it to a flow gives the flow a standard logistic prior (NICE, arXiv:1410.8516,
    section 3.4) while the model's base stays N(0, I): ``log N(eps) + log|d eps/dx| =
    log Logistic(x)``. Computed in the tail that keeps precision (``-Phi^-1(sigmoid(-x))`` for
    x > 0, and ``log Phi`` via `log_ndtr` for the inverse).
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        a = x.abs()
        # Phi^-1(sigmoid(x)) for x < 0, -Phi^-1(sigmoid(-x)) for x >= 0: the argument stays in
        # the lower tail, where floating point has its resolution.
        lower = torch.special.ndtri(torch.sigmoid(-a))
        eps = torch.where(x < 0, lower, -lower)
        # log sigmoid(x) + log sigmoid(-x) = -|x| - 2 softplus(-|x|): one softplus.
        log_logistic = -a - 2.0 * F.softplus(-a)
        log_normal = -0.5 * eps * eps - HALF_LOG_2PI
        return eps, sum_except_batch(log_logistic - log_normal)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # x = logit(Phi(z)). With the lower tail p = Phi(-|z|), log p by log_ndtr (precise where
        # p underflows): |x| = log(1 - p) - log p, and log sigmoid(x) + log sigmoid(-x) =
        # log p + log(1 - p). One log_ndtr instead of two, and no logsigmoid.
        log_p = torch.special.log_ndtr(-z.abs())
        log_1mp = torch.log1p(-torch.exp(log_p))
        x = torch.copysign(log_1mp - log_p, z)
        log_normal = -0.5 * z * z - HALF_LOG_2PI
        return x, -sum_except_batch(log_p + log_1mp - log_normal)
