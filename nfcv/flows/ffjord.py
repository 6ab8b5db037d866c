"""Continuous-time flow, FFJORD (Grathwohl et al. 2019, arXiv:1810.01367).

``dy/dt = f(y, t)`` from t = 0 to `time`; the log-det is ``integral tr(df/dy) dt``, computed with
Hutchinson's estimator ``eps^T (df/dy) eps`` (one Gaussian eps per solve) when training, and
exactly (D backward passes) when evaluating a level with at most `exact_max_dim` elements per
image. Integrated with torchdiffeq's adaptive solvers; both directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchdiffeq import odeint

from nfcv.flows.base import Bijector, check_channels


class ConcatConv2d(nn.Conv2d):
    """A conv that sees the time t as one more input channel (FFJORD's ConcatConv2d)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        tt = t.to(x.dtype).expand(x.shape[0], 1, *x.shape[2:])
        return F.conv2d(torch.cat([x, tt], dim=1), self.weight, self.bias, padding=self.padding)


class ODENet(nn.Module):
    """f(y, t): three time-conditioned 3x3 convs with softplus; the last starts at zero, so the
    flow starts as the identity."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [
                ConcatConv2d(channels, hidden),
                ConcatConv2d(hidden, hidden),
                ConcatConv2d(hidden, channels),
            ]
        )
        nn.init.zeros_(self.layers[-1].weight)
        nn.init.zeros_(self.layers[-1].bias)

    def forward(self, y: Tensor, t: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            y = layer(y, t)
            if i < len(self.layers) - 1:
                y = F.softplus(y)
        return y


class FFJORD(Bijector):
    """A continuous normalizing flow block over (C, H, W) inputs.

    `trace`: ``"auto"`` (Hutchinson in training, exact in eval where D <= `exact_max_dim`),
    ``"exact"`` or ``"hutchinson"``. `rtol`/`atol` are the solver's tolerances: inverse and
    log-det are exact to those, not to machine precision.
    """

    def __init__(
        self,
        num_channels: int,
        hidden: int = 32,
        time: float = 1.0,
        rtol: float = 1e-5,
        atol: float = 1e-5,
        method: str = "dopri5",
        trace: str = "auto",
        exact_max_dim: int = 256,
    ):
        super().__init__()
        if trace not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"trace must be auto, exact or hutchinson, got {trace!r}")
        self.num_channels = num_channels
        self.net = ODENet(num_channels, hidden)
        self.time = float(time)
        self.rtol, self.atol, self.method = rtol, atol, method
        self.trace = trace
        self.exact_max_dim = exact_max_dim

    def _use_exact(self, dim: int) -> bool:
        if self.trace == "auto":
            return not self.training and dim <= self.exact_max_dim
        return self.trace == "exact"

    def _integrate(self, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        dim = x[0].numel()
        exact = self._use_exact(dim)
        eps = None if exact else torch.randn_like(x)
        keep_graph = torch.is_grad_enabled()  # training: the trace itself must be differentiable

        def dynamics(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            y = state[0]
            with torch.enable_grad():
                if not y.requires_grad:
                    y = y.detach().requires_grad_(True)
                dy = self.net(y, t)
                if exact:
                    flat = dy.reshape(dy.shape[0], -1)
                    trace = dy.new_zeros(dy.shape[0])
                    for i in range(dim):  # d f_i / d y_i, one backward pass each
                        grad = torch.autograd.grad(
                            flat[:, i].sum(), y, retain_graph=True, create_graph=keep_graph
                        )[0]
                        trace = trace + grad.reshape(dy.shape[0], -1)[:, i]
                else:
                    vjp = torch.autograd.grad(dy, y, eps, create_graph=keep_graph)[0]
                    trace = (vjp * eps).reshape(dy.shape[0], -1).sum(1)
            if not keep_graph:
                dy, trace = dy.detach(), trace.detach()
            return dy, trace

        times = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
        ys, logdets = odeint(
            dynamics,
            (x, x.new_zeros(x.shape[0])),
            times,
            rtol=self.rtol,
            atol=self.atol,
            method=self.method,
        )
        return ys[-1], logdets[-1]

    def _solve(self, x: Tensor, t0: float, t1: float) -> tuple[Tensor, Tensor]:
        if torch.is_inference_mode_enabled():
            # The trace needs autograd, which inference tensors forbid: leave inference mode
            # for the solve (results are returned without a graph, as under no_grad).
            with torch.inference_mode(False), torch.no_grad():
                y, logdet = self._integrate(x.clone(), t0, t1)
            return y.clone(), logdet.clone()
        return self._integrate(x, t0, t1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, 0.0, self.time)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Integrating the same dynamics backwards accumulates -integral tr: the inverse's log-det.
        return self._solve(z, self.time, 0.0)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)
