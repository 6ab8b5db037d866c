"""Elementwise monotone transforms used by coupling layers: rational-quadratic splines (Durkan et
al. 2019, arXiv:1906.04032) and the logit of a mixture of logistics CDF (Flow++, Ho et al. 2019,
arXiv:1902.00275)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Lower bounds that keep every bin, and every slope, away from zero (nflows' defaults).
MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(DERIVATIVE_SHIFT) + MIN_DERIVATIVE = 1: zero network outputs give slope 1 at every knot.
DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def _knots(unnormalized: Tensor, min_size: float, bound: float) -> tuple[Tensor, Tensor]:
    """Bin sizes and knot positions on [-bound, bound] from unnormalised logits (..., K)."""
    k = unnormalized.shape[-1]
    sizes = min_size + (1 - min_size * k) * torch.softmax(unnormalized, dim=-1)
    cum = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
    cum = 2 * bound * cum - bound
    cum = torch.cat(
        [
            torch.full_like(cum[..., :1], -bound),
            cum[..., 1:-1],
            torch.full_like(cum[..., :1], bound),
        ],
        dim=-1,
    )
    return cum[..., 1:] - cum[..., :-1], cum


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(-1, idx[..., None])[..., 0]


def rational_quadratic_spline(
    x: Tensor,
    widths: Tensor,
    heights: Tensor,
    derivatives: Tensor,
    bound: float,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline on [-bound, bound], identity outside (linear tails).

    `widths`, `heights` are unnormalised (..., K); `derivatives` unnormalised (..., K - 1) at the
    inner knots (the outer knots have slope 1, matching the tails). All-zero parameters give the
    identity. Returns (y, log|dy/dx|) for the direction asked, elementwise.
    """
    inside = (x >= -bound) & (x <= bound)
    xin = x.clamp(-bound, bound)
    w, cw = _knots(widths, MIN_BIN_WIDTH, bound)
    h, ch = _knots(heights, MIN_BIN_HEIGHT, bound)
    d = MIN_DERIVATIVE + F.softplus(F.pad(derivatives, (1, 1)) + DERIVATIVE_SHIFT)

    locations = ch if inverse else cw
    # Bin index: how many inner knots lie at or below the point.
    idx = (xin[..., None] >= locations[..., 1:-1]).sum(dim=-1)
    w_k, cw_k, h_k, ch_k = _gather(w, idx), _gather(cw, idx), _gather(h, idx), _gather(ch, idx)
    d_k, d_k1 = _gather(d, idx), _gather(d[..., 1:], idx)
    delta = h_k / w_k
    slope_sum = d_k + d_k1 - 2 * delta

    if not inverse:
        theta = (xin - cw_k) / w_k
    else:
        # The root of a theta^2 + b theta + c = 0 in [0, 1], in float64: its terms cancel badly
        # in float32 when a bin's mean slope is far from its knot slopes.
        f64 = torch.float64
        dy, sd, hk, dl, dk = (t.to(f64) for t in (xin - ch_k, slope_sum, h_k, delta, d_k))
        a = dy * sd + hk * (dl - dk)
        b = hk * dk - dy * sd
        c = -dl * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp_min(0.0) + 1e-300)
        # The citardauq form when b >= 0, the textbook form otherwise: no cancellation either way.
        theta_pos = 2 * c / (-b - root)
        theta_neg = (-b + root) / (2 * torch.where(a == 0, torch.ones_like(a), a))
        theta = torch.where(b >= 0, theta_pos, theta_neg).clamp(0.0, 1.0).to(x.dtype)
    t1t = theta * (1 - theta)
    denominator = delta + slope_sum * t1t
    if not inverse:
        out = ch_k + h_k * (delta * theta * theta + d_k * t1t) / denominator
    else:
        out = cw_k + theta * w_k
    log_deriv = (
        2 * torch.log(delta)
        + torch.log(d_k1 * theta * theta + 2 * delta * t1t + d_k * (1 - theta) ** 2)
        - 2 * torch.log(denominator)
    )
    logdet = -log_deriv if inverse else log_deriv
    return torch.where(inside, out, x), torch.where(inside, logdet, torch.zeros_like(x))


def _log_sigmoid_pair(u: Tensor) -> tuple[Tensor, Tensor]:
    return F.logsigmoid(u), F.logsigmoid(-u)


def mixture_logistic_logit(
    x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor]:
    """``y = logit(sum_k pi_k sigmoid((x - mu_k) / s_k))`` and log dy/dx, elementwise.

    Mixture parameters have a trailing component dimension (..., K). Computed in log space:
    ``y = log CDF - log(1 - CDF)``, both by logsumexp, so it stays finite in the tails.
    """
    log_pi = torch.log_softmax(logits, dim=-1)
    u = (x[..., None] - means) * torch.exp(-log_scales)
    log_s, log_1ms = _log_sigmoid_pair(u)
    log_cdf = torch.logsumexp(log_pi + log_s, dim=-1)
    log_sf = torch.logsumexp(log_pi + log_1ms, dim=-1)
    log_pdf = torch.logsumexp(log_pi + log_s + log_1ms - log_scales, dim=-1)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


def mixture_logistic_logit_inverse(
    y: Tensor,
    logits: Tensor,
    means: Tensor,
    log_scales: Tensor,
    tol: float = 1e-6,
    max_iters: int = 200,
) -> Tensor:
    """Invert `mixture_logistic_logit` by bisection to `tol` (the map is strictly increasing).

    The bisection runs without autograd; it stops at `tol`, or when the bracket stops shrinking
    at the dtype's precision. With gradients enabled a final Newton step carries them.
    """
    with torch.no_grad():
        root = _bisect(y, logits, means, log_scales, tol, max_iters)
    if not torch.is_grad_enabled():
        return root
    # One Newton step with autograd on: the same value to first order, and the gradient of the
    # root with respect to y and the mixture (implicit function theorem) instead of none.
    value, log_slope = mixture_logistic_logit(root, logits, means, log_scales)
    return root + (y - value) * torch.exp(-log_slope)


def _bisect(y, logits, means, log_scales, tol, max_iters):
    scales = torch.exp(log_scales)
    # Beyond every component's mean +/- (|y| + 30) scales, the mixture's logit exceeds |y|.
    reach = (y.abs()[..., None] + 30.0) * scales
    lo = (means - reach).min(dim=-1).values
    hi = (means + reach).max(dim=-1).values
    for _ in range(max_iters):
        mid = 0.5 * (lo + hi)
        below = mixture_logistic_logit(mid, logits, means, log_scales)[0] < y
        new_lo, new_hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        if torch.equal(new_lo, lo) and torch.equal(new_hi, hi):
            break  # at the dtype's resolution
        lo, hi = new_lo, new_hi
        if bool(((hi - lo) <= tol).all()):
            break
    return 0.5 * (lo + hi)
