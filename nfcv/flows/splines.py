"""Elementwise monotone transforms used by coupling layers: rational-quadratic splines (Durkan et
al. 2019, arXiv:1906.04032), the logit of a mixture of logistics CDF (Flow++, Ho et al. 2019,
arXiv:1902.00275) and the deep sigmoidal flow (NAF, Huang et al. 2018, arXiv:1804.00779), with
the bisection that inverts the last two."""

from __future__ import annotations

import math
from collections.abc import Callable

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
    at the dtype's precision. With gradients enabled the root carries them (`invert_increasing`).
    """
    with torch.no_grad():
        # Beyond every component's mean +/- (|y| + 30) scales, the mixture's logit exceeds |y|.
        reach = (y.abs()[..., None] + 30.0) * torch.exp(log_scales)
        lo = (means - reach).min(dim=-1).values
        hi = (means + reach).max(dim=-1).values
    return invert_increasing(
        lambda x: mixture_logistic_logit(x, logits, means, log_scales), y, lo, hi, tol, max_iters
    )


def invert_increasing(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]],
    y: Tensor,
    lo: Tensor,
    hi: Tensor,
    tol: float = 1e-6,
    max_iters: int = 200,
) -> Tensor:
    """The x with ``fn(x)[0] == y``, elementwise, for `fn` strictly increasing and returning
    ``(value, log slope)``, given a bracket with ``fn(lo) <= y <= fn(hi)``.

    Bisection without autograd, to a bracket of width `tol` in x, or until the bracket stops
    shrinking at the dtype's precision, or `max_iters` halvings. With gradients enabled the
    root carries them by the implicit function theorem; its value stays the bisection's.
    """
    with torch.no_grad():
        for _ in range(max_iters):
            mid = 0.5 * (lo + hi)
            below = fn(mid)[0] < y
            new_lo, new_hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
            if torch.equal(new_lo, lo) and torch.equal(new_hi, hi):
                break  # at the dtype's resolution
            lo, hi = new_lo, new_hi
            if bool(((hi - lo) <= tol).all()):
                break
        root = 0.5 * (lo + hi)
    if not torch.is_grad_enabled():
        return root
    # The gradient of the root with respect to y and fn's parameters, dx = (dy - dfn) / fn'
    # (implicit function theorem), as a zero-valued Newton step: taking the step itself would
    # overshoot where fn is nearly flat (a DSF between two steep units: slopes of e^-40 turn a
    # rounding-level residual into a jump of hundreds), and it could not improve on bisection.
    value, log_slope = fn(root)
    residual = y - value
    inv_slope = torch.exp(-log_slope.detach()).clamp(max=torch.finfo(root.dtype).max)
    return root + (residual - residual.detach()) * inv_slope


def deep_sigmoidal_flow(
    x: Tensor, log_w: Tensor, log_a: Tensor, b: Tensor
) -> tuple[Tensor, Tensor]:
    """NAF's deep sigmoidal flow with one hidden layer (arXiv:1804.00779, section 3.3):
    ``y = logit(sum_k w_k sigmoid(a_k x + b_k))`` and log dy/dx, elementwise.

    The unit parameters have a trailing dimension (..., K): `log_w` normalised log weights (a
    log-softmax), `log_a` the log slopes, `b` the offsets. Computed in log space: ``y = log S -
    log(1 - S)``, both by logsumexp of log-sigmoids, and ``dy/dx = S' / (S (1 - S))`` with
    ``log S' = logsumexp(log w + log a + log sigmoid(u) + log sigmoid(-u))``, so y and the
    log-derivative stay finite where S rounds to 0 or 1.
    """
    u = torch.exp(log_a) * x[..., None] + b
    log_s, log_1ms = _log_sigmoid_pair(u)
    log_cdf = torch.logsumexp(log_w + log_s, dim=-1)
    log_sf = torch.logsumexp(log_w + log_1ms, dim=-1)
    log_dcdf = torch.logsumexp(log_w + log_a + log_s + log_1ms, dim=-1)
    return log_cdf - log_sf, log_dcdf - log_cdf - log_sf


def deep_sigmoidal_flow_inverse(
    y: Tensor,
    log_w: Tensor,
    log_a: Tensor,
    b: Tensor,
    tol: float = 1e-6,
    max_iters: int = 200,
) -> Tensor:
    """Invert `deep_sigmoidal_flow` by bisection (`invert_increasing`) to `tol` in x.

    The map is a bijection of the real line: every unit's sigmoid covers (0, 1), so S does and
    its logit covers R. The bracket is exact: where every unit has ``a_k x + b_k >= y``, S is at
    least sigmoid(y) and the output at least y, so ``hi = max_k (y - b_k) / a_k`` (and ``lo =
    min_k``, symmetrically) bracket the root; the margin only absorbs rounding.
    """
    with torch.no_grad():
        per_unit = (y[..., None] - b) * torch.exp(-log_a)
        lo, hi = per_unit.min(dim=-1).values, per_unit.max(dim=-1).values
        margin = 1.0 + 1e-3 * torch.maximum(lo.abs(), hi.abs())
        lo, hi = lo - margin, hi + margin
    return invert_increasing(
        lambda x: deep_sigmoidal_flow(x, log_w, log_a, b), y, lo, hi, tol, max_iters
    )
