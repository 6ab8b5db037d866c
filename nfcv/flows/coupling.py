"""Coupling layers: additive (NICE, Dinh et al. 2014, arXiv:1410.8516), affine (RealNVP, Dinh et
al. 2016, arXiv:1605.08803; Glow's variant, arXiv:1807.03039), rational-quadratic spline (Durkan
et al. 2019, arXiv:1906.04032), mixture-of-logistics CDF (Flow++, Ho et al. 2019,
arXiv:1902.00275) and deep sigmoidal flow (NAF, Huang et al. 2018, arXiv:1804.00779), each with a
channel mask or a checkerboard mask and any coupling network.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels, sum_except_batch
from nfcv.flows.splines import (
    deep_sigmoidal_flow,
    deep_sigmoidal_flow_inverse,
    mixture_logistic_logit,
    mixture_logistic_logit_inverse,
    rational_quadratic_spline,
)

NetFactory = Callable[[int, int], nn.Module]

# Glow bounds the scale as sigmoid(h + 2): in (0, 1), about 0.88 when the net outputs 0, so a
# coupling can only contract, which keeps deep stacks from blowing up (openai/glow, model.py).
SIGMOID_SCALE_SHIFT = 2.0
# Flow++ keeps mixture log-scales above -7 (arXiv:1902.00275 code): narrower logistics make the
# CDF a near step whose inverse bisection cannot resolve. The upper bound keeps exp finite.
MIN_LOG_SCALE, MAX_LOG_SCALE = -7.0, 7.0
# softplus(SOFTPLUS_ONE) = 1: a zero network output gives the DSF slope a = 1.
SOFTPLUS_ONE = math.log(math.expm1(1.0))


def checkerboard(height: int, width: int, parity: int, like: Tensor) -> Tensor:
    """(1, 1, H, W) mask, 1 on the squares with (h + w + parity) even: the conditioning half."""
    h = torch.arange(height, device=like.device)[:, None]
    w = torch.arange(width, device=like.device)[None, :]
    return ((h + w + parity) % 2 == 0).to(like.dtype)[None, None]


class Coupling(Bijector):
    """``x = (x_a, x_b) -> (x_a, T(x_b; net(x_a)))`` with T an elementwise bijection.

    `mask="channel"`: x_a is the first ``C // 2`` channels (Glow); `mask="checkerboard"`: x_a is
    every other pixel of every channel, chosen by `parity` (RealNVP), and the network sees the
    image with the transformed squares zeroed. Subclasses give T as `_elementwise`, with
    `params_per_element` network outputs per transformed element, laid out channel-major
    (output channel ``P * i + p`` is parameter p of element channel i: openai/glow's
    interleaving for affine). The pass-through half is returned bit for bit.
    """

    params_per_element = 1

    def __init__(
        self,
        num_channels: int,
        net: NetFactory,
        mask: str = "channel",
        parity: int = 0,
        net_kwargs: dict | None = None,
    ):
        super().__init__()
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask must be 'channel' or 'checkerboard', got {mask!r}")
        if mask == "channel" and num_channels < 2:
            raise ValueError(
                f"{type(self).__name__} with a channel mask needs at least 2 channels, got "
                f"{num_channels}; squeeze the image first or use mask=checkerboard"
            )
        self.num_channels = num_channels
        self.mask = mask
        self.parity = int(parity) % 2
        if mask == "channel":
            # parity 0 conditions on the first C // 2 channels, parity 1 on the last C // 2.
            self.c1 = num_channels // 2
            self.c2 = num_channels - self.c1
        else:
            self.c1 = self.c2 = num_channels
        # `net_kwargs` come from the assembler (e.g. the spatial size a network's position
        # embedding needs); the config's own network arguments are bound in `net` already.
        self.net = net(self.c1, self.params_per_element * self.c2, **(net_kwargs or {}))

    def _elementwise(self, v: Tensor, p: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        """T(v) (or T^-1(v) when `inverse`) and the elementwise log|det| of that same map."""
        raise NotImplementedError  # pragma: no cover - interface

    # Set by `ImageFlow.checkpoint_networks`: recompute the network in the backward pass instead
    # of keeping its activations (gradient checkpointing), trading compute for memory.
    checkpoint_grads = False

    def _params(self, cond: Tensor, context: Tensor | None) -> Tensor:
        args = (cond,) if context is None else (cond, context)
        if self.checkpoint_grads and torch.is_grad_enabled() and self.training:
            h = torch.utils.checkpoint.checkpoint(self.net, *args, use_reentrant=False)
        else:
            h = self.net(*args)
        b, _, height, width = h.shape
        return h.view(b, self.c2, self.params_per_element, height, width).permute(0, 1, 3, 4, 2)

    def _couple(self, x: Tensor, inverse: bool, context: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.mask == "channel":
            # split, not two slices: its backward is one concatenation, where each slice's
            # backward fills a zero tensor of the input's size and the two are then added.
            if self.parity == 0:
                xa, xb = x.split([self.c1, self.c2], dim=1)
            else:
                xb, xa = x.split([self.c2, self.c1], dim=1)
            yb, logdet = self._elementwise(xb, self._params(xa, context), inverse)
            y = torch.cat([xa, yb] if self.parity == 0 else [yb, xa], dim=1)
            return y, sum_except_batch(logdet)
        m = checkerboard(x.shape[2], x.shape[3], self.parity, x)
        y, logdet = self._elementwise(x, self._params(x * m, context), inverse)
        keep = m.bool()
        return torch.where(keep, x, y), sum_except_batch(torch.where(keep, 0.0, logdet))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """`context`: an extra input of the network (conditional flows), or None."""
        return self._couple(x, inverse=False, context=context)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, inverse=True, context=context)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)


class AdditiveCoupling(Coupling):
    """``T(v) = v + t``: volume-preserving, log-det 0 (NICE)."""

    def _elementwise(self, v, p, inverse):
        t = p[..., 0]
        return (v - t if inverse else v + t), torch.zeros_like(v)


class AffineCoupling(Coupling):
    """Affine coupling with a bounded scale, in one of two published forms:

    - ``scale="sigmoid"`` (Glow): ``T(v) = (v + t) * s`` with ``s = sigmoid(h + 2)``; log s is
      computed as logsigmoid, so it stays finite for any network output.
    - ``scale="tanh"`` (RealNVP, arXiv:1605.08803, section 4.1): ``T(v) = v * exp(s) + t`` with
      ``s = gamma * tanh(h)`` and a learned per-channel gamma (starting at 1).
    """

    params_per_element = 2

    def __init__(
        self,
        num_channels: int,
        net: NetFactory,
        mask: str = "channel",
        parity: int = 0,
        scale: str = "sigmoid",
        net_kwargs: dict | None = None,
    ):
        if scale not in ("sigmoid", "tanh"):
            raise ValueError(f"scale must be 'sigmoid' (Glow) or 'tanh' (RealNVP), got {scale!r}")
        super().__init__(num_channels, net, mask, parity, net_kwargs)
        self.scale = scale
        if scale == "tanh":
            self.gamma = nn.Parameter(torch.ones(1, self.c2, 1, 1))

    def _elementwise(self, v, p, inverse):
        if self.scale == "tanh":
            shift, raw = p.unbind(-1)
            log_s = self.gamma * torch.tanh(raw)
            if inverse:
                return (v - shift) * torch.exp(-log_s), -log_s
            return v * torch.exp(log_s) + shift, log_s
        shift, raw = p.unbind(-1)  # one backward (a stack), not a zero fill per index
        log_s = F.logsigmoid(raw + SIGMOID_SCALE_SHIFT)
        if inverse:
            return v * torch.exp(-log_s) - shift, -log_s
        return (v + shift) * torch.exp(log_s), log_s


class SplineCoupling(Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019, arXiv:1906.04032).

    Each transformed element goes through its own monotone spline with `num_bins` bins on
    [-bound, bound] (identity outside); the network's zero-initialised last layer makes every
    spline the identity at the start. Analytic inverse.
    """

    def __init__(
        self,
        num_channels: int,
        net: NetFactory,
        num_bins: int = 8,
        bound: float = 3.0,
        mask: str = "channel",
        parity: int = 0,
        net_kwargs: dict | None = None,
    ):
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {num_bins}")
        self.params_per_element = 3 * num_bins - 1
        self.num_bins = num_bins
        self.bound = float(bound)
        super().__init__(num_channels, net, mask, parity, net_kwargs)

    def _elementwise(self, v, p, inverse):
        k = self.num_bins
        return rational_quadratic_spline(
            v, p[..., :k], p[..., k : 2 * k], p[..., 2 * k :], self.bound, inverse=inverse
        )


class MixLogCDFCoupling(Coupling):
    """Flow++'s coupling: ``T(v) = logit(MixLogCDF(v; pi, mu, s)) * exp(a) + b`` (arXiv:1902.00275,
    section 3.2), all parameters from the network; ``a = tanh(.)`` bounds the scale.

    The inverse solves the mixture CDF by bisection to `tol` (no gradient flows through that
    root). With zero network outputs every component is the standard logistic, whose CDF's logit
    is the identity.

    From there the components would never separate: identical components get identical
    gradients, so the mixture stays one logistic (measured: the means' spread stays exactly 0
    through training). With `mean_gains` each component's mean is the network output times a
    fixed gain from 0.5 to 1.5, as NAF's offsets (`NAFCoupling`): still the identity at the
    start, distinct components after the first step. The configs set it; False (the class
    default) is the behaviour of checkpoints saved before it existed, which keep their function.
    """

    def __init__(
        self,
        num_channels: int,
        net: NetFactory,
        num_components: int = 4,
        tol: float = 1e-6,
        mask: str = "channel",
        parity: int = 0,
        net_kwargs: dict | None = None,
        mean_gains: bool = False,
    ):
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.params_per_element = 3 * num_components + 2
        self.num_components = num_components
        self.tol = tol
        super().__init__(num_channels, net, mask, parity, net_kwargs)
        k = num_components
        gains = torch.linspace(0.5, 1.5, k) if mean_gains and k > 1 else torch.ones(k)
        self.mean_gains = bool(mean_gains)
        # Saved with the weights: a checkpoint from before `mean_gains` has no such entry and
        # loads with gains of 1 (its function), whatever the config building the model says
        # (a resumed run composes today's config).
        self.register_buffer("component_gains", gains)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "component_gains"
        if key not in state_dict:
            state_dict[key] = torch.ones_like(self.component_gains)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.component_gains.is_meta:
            self.mean_gains = bool((self.component_gains != 1).any())

    def _elementwise(self, v, p, inverse):
        k = self.num_components
        logits, means = p[..., :k], p[..., k : 2 * k] * self.component_gains.to(p.dtype)
        log_scales = p[..., 2 * k : 3 * k].clamp(MIN_LOG_SCALE, MAX_LOG_SCALE)
        a, b = torch.tanh(p[..., 3 * k]), p[..., 3 * k + 1]
        if not inverse:
            y, log_dy = mixture_logistic_logit(v, logits, means, log_scales)
            return y * torch.exp(a) + b, log_dy + a
        y = (v - b) * torch.exp(-a)
        x = mixture_logistic_logit_inverse(y, logits, means, log_scales, tol=self.tol)
        _, log_dy = mixture_logistic_logit(x, logits, means, log_scales)
        return x, -(log_dy + a)


class NAFCoupling(Coupling):
    """NAF's coupling (Huang et al. 2018, arXiv:1804.00779, section 3.3): each transformed
    element goes through its own deep sigmoidal flow with `num_hidden` units K,
    ``T(v) = logit(sum_k w_k sigmoid(a_k v + b_k))``, a bijection of the real line whose 3K
    pseudo-parameters per element come from the network: ``a = softplus(.)`` (clamped to [e^-7,
    e^7], the range Flow++ allows its logistics' inverse scales), ``w = softmax(.)`` and b.

    A zero network output gives a = 1, b = 0 and uniform w: every unit is sigmoid(v), whose
    logit is v, so the coupling starts as the identity. The units would then also stay
    identical (every unit gets the same gradient, and K identical units are one unit, an
    affine map), so b_k is the network output times a fixed gain from 0.5 to 1.5 per unit:
    still b = 0 at the start, different units after the first step. The inverse solves T by
    bisection (`splines.invert_increasing`) to a bracket `tol` wide in v (default 1e-6), or to
    the dtype's resolution where that is coarser; the root carries gradients by the implicit
    function theorem.
    """

    def __init__(
        self,
        num_channels: int,
        net: NetFactory,
        num_hidden: int = 8,
        tol: float = 1e-6,
        mask: str = "channel",
        parity: int = 0,
        net_kwargs: dict | None = None,
    ):
        if not isinstance(num_hidden, int) or isinstance(num_hidden, bool) or num_hidden < 1:
            raise ValueError(
                f"num_hidden (DSF units per element) must be an integer >= 1, got {num_hidden!r}"
            )
        if not tol > 0:
            raise ValueError(f"tol (the inverse's bisection tolerance) must be > 0, got {tol!r}")
        self.params_per_element = 3 * num_hidden
        self.num_hidden = num_hidden
        self.tol = tol
        super().__init__(num_channels, net, mask, parity, net_kwargs)
        gains = torch.linspace(0.5, 1.5, num_hidden) if num_hidden > 1 else torch.ones(1)
        # Not in the state dict: fixed by num_hidden, like the mask.
        self.register_buffer("offset_gains", gains, persistent=False)

    def _elementwise(self, v, p, inverse):
        k = self.num_hidden
        slope = F.softplus(p[..., :k] + SOFTPLUS_ONE)
        # Clamp before the log: softplus(-1e4) is 0 in float32 and log 0 would poison gradients.
        log_a = torch.log(slope.clamp(math.exp(MIN_LOG_SCALE), math.exp(MAX_LOG_SCALE)))
        b = p[..., k : 2 * k] * self.offset_gains
        log_w = torch.log_softmax(p[..., 2 * k :], dim=-1)
        if not inverse:
            return deep_sigmoidal_flow(v, log_w, log_a, b)
        x = deep_sigmoidal_flow_inverse(v, log_w, log_a, b, tol=self.tol)
        _, log_dy = deep_sigmoidal_flow(x, log_w, log_a, b)
        return x, -log_dy
