"""Residual flows: invertible residual blocks ``y = x + g(x)`` with g contractive.

i-ResNet (Behrmann et al. 2019, arXiv:1811.00995) and Residual Flows (Chen et al. 2019,
arXiv:1906.02735; the authors' code, rtqichen/residual-flows). g is a small CNN whose
convolutions are spectrally normalised to a Lipschitz coefficient ``lipschitz < 1`` and whose
activations are LipSwish (Lipschitz 1), so Lip(g) <= lipschitz ** (number of convolutions) < 1 and
``x + g(x)`` is invertible (Banach's fixed-point theorem).

- **Spectral normalisation.** Each convolution's weight is divided by ``max(1, sigma / lipschitz)``
  with sigma the operator norm of the convolution itself on the block's (H, W) inputs (zero
  padding), estimated by power iteration with ``conv2d`` and its adjoint ``conv_transpose2d`` on
  one image: the norm of the reshaped ``(C_out, C_in k k)`` weight matrix neither bounds nor
  equals it for k > 1. The iteration vectors are buffers, warm-started: `init_power_iterations`
  steps at the first use (stored; not after loading a state dict), then `power_iterations` steps
  per training forward (stored), `eval_power_iterations` steps from the stored vectors in
  evaluation (not stored, so evaluation changes nothing). sigma is the Rayleigh quotient
  ``u^T A v``, differentiated through the weight (Miyato et al. 2018). 1x1 convolutions (and the
  dense blocks) iterate on the weight matrix, which is their operator.
- **Inverse** by the fixed-point iteration ``x <- y - g(x)``, until
  ``L / (1 - L) * ||x_k - x_(k-1)||_2 <= tol`` for every sample (so ``||x_k - x*||_2 <= tol``,
  L = lipschitz ** n_convs, up to the power iteration's accuracy) or the step reaches the
  rounding level of the dtype; `NumericalError` after `max_iter` iterations.
- **Log-determinant** ``log det(I + J_g) = sum_k (-1)^(k+1) tr(J_g^k) / k``:
  ``logdet="estimate"`` (default): in training, Residual Flows' unbiased estimator: the series
  cut at ``n = exact_terms + N`` terms, N drawn per batch from a Poisson (rate `poisson_rate`) or
  geometric (`geometric_p`) distribution, term k weighted by ``1 / P(N >= k - exact_terms)``
  (the Russian roulette), each trace by Hutchinson's estimator ``v^T J^k v`` with one Rademacher
  probe v per image through vector-Jacobian products. Its gradient is the Neumann-series
  gradient (`neumann_grad`, Chen et al. section 3.2): ``v^T (sum_k (-1)^k c_(k+1) J^k) dJ v``, one
  differentiable VJP whatever n is; the value returned is the estimate itself (not a surrogate).
  With ``neumann_grad=False`` the terms are backpropagated directly (memory grows with n). In
  evaluation: the same unbiased estimator, deterministic: `eval_exact_terms` exact terms and a
  roulette tail drawn per image, averaged over `eval_probes` probes, all drawn from generators
  seeded with `eval_seed` at every call (the same batch always gives the same figure), so
  images' errors are independent, with mean 0.
  ``logdet="exact"``: the brute-force Jacobian (D vector-Jacobian products per sample) and
  `slogdet`, in training and evaluation: for tiny inputs (the tests).

N is drawn from Python's `random` (training: the global one, which nfcv seeds and checkpoints;
evaluation: a private `random.Random(eval_seed)`), so a training step reads nothing back from
the device. The block runs with autocast off, in float32 at least: the fixed-point inverse and the
Lipschitz bound are not meaningful in bfloat16.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.errors import NumericalError
from nfcv.flows.actnorm import ActNorm
from nfcv.flows.base import Bijector, Sequential, Shape, at_least_float32, no_autocast
from nfcv.flows.multiscale import Levels, Squeeze, check_divisible

_NORM_EPS = 1e-12


def _unit(x: Tensor) -> Tensor:
    return x / (x.norm() + _NORM_EPS)


class LipSwish(nn.Module):
    """``x * sigmoid(beta x) / 1.1`` with ``beta = softplus(b)`` learned (one per activation):
    Residual Flows' LipSwish, Lipschitz 1 for every beta >= 0 (the slope of Swish is at most
    1.0998). `b` starts at 0.5 as in the authors' code."""

    def __init__(self):
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * F.softplus(self.raw_beta)) / 1.1


class SpectralNormConv2d(nn.Module):
    """A stride-1, zero-padded ("same") k x k convolution, normalised so that its operator norm on
    (in_channels, H, W) inputs is at most `lipschitz`. `normalised_weight` returns the weight to
    convolve with; the module itself is not called."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        spatial: Sequence[int],
        lipschitz: float,
        init_power_iterations: int = 10,
    ):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"kernel sizes must be odd (zero padding keeps the size), got {kernel_size}"
            )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = kernel_size
        self.padding = kernel_size // 2
        self.spatial = tuple(int(s) for s in spatial)
        self.lipschitz = float(lipschitz)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size)  # PyTorch's default init
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(conv.bias.detach().clone())
        # The power iteration's vectors: in the input and output spaces of the operator.
        in_shape = (in_channels,) if kernel_size == 1 else (in_channels, *self.spatial)
        out_shape = (out_channels,) if kernel_size == 1 else (out_channels, *self.spatial)
        self.register_buffer("u", _unit(torch.randn(out_shape)))
        self.register_buffer("v", _unit(torch.randn(in_shape)))
        # The first use runs `init_power_iterations` (stored) from the random start, unless the
        # vectors came from a state dict: building a model (a 25M-parameter one too) stays
        # cheap, and the flag is Python state, so no step reads it back from the device.
        self.init_power_iterations = int(init_power_iterations)
        self._pending_init = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "u" in state_dict and prefix + "v" in state_dict:
            self._pending_init = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _op(self, weight: Tensor, v: Tensor) -> Tensor:
        """The operator A: v (input space) -> A v (output space)."""
        if self.kernel_size == 1:
            return weight.reshape(self.out_channels, self.in_channels) @ v
        return F.conv2d(v.unsqueeze(0), weight, padding=self.padding)[0]

    def _op_adjoint(self, weight: Tensor, u: Tensor) -> Tensor:
        if self.kernel_size == 1:
            return weight.reshape(self.out_channels, self.in_channels).t() @ u
        return F.conv_transpose2d(u.unsqueeze(0), weight, padding=self.padding)[0]

    def _iterate(
        self, weight: Tensor, u: Tensor, v: Tensor, iterations: int, store: bool
    ) -> tuple[Tensor, Tensor]:
        for _ in range(iterations):
            v = _unit(self._op_adjoint(weight, u))
            u = _unit(self._op(weight, v))
        if store and iterations:
            self.u.copy_(u)
            self.v.copy_(v)
        return u.clone(), v.clone()

    def sigma(self, iterations: int, store: bool) -> Tensor:
        """The estimate ``u^T A v`` of the operator norm after `iterations` power iterations from
        the stored vectors (stored back when `store`); differentiable in the weight."""
        with torch.no_grad():
            if self._pending_init:
                weight = self.weight.detach()
                self._iterate(weight, self.u, self.v, self.init_power_iterations, store=True)
                self._pending_init = False
            u, v = self._iterate(self.weight.detach(), self.u, self.v, iterations, store)
        return (u * self._op(self.weight, v)).sum()

    def normalised_weight(self, iterations: int, store: bool) -> Tensor:
        factor = torch.clamp(self.sigma(iterations, store) / self.lipschitz, min=1.0)
        return self.weight / factor

    def operator_matrix(self, weight: Tensor | None = None) -> Tensor:
        """The dense matrix of the convolution on (in_channels, H, W) inputs (for tests: tiny
        sizes only)."""
        weight = self.weight if weight is None else weight
        c, (h, w) = self.in_channels, self.spatial
        eye = torch.eye(c * h * w, dtype=weight.dtype, device=weight.device)
        out = F.conv2d(eye.view(-1, c, h, w), weight, padding=self.padding)
        return out.reshape(c * h * w, -1).t()


class ResidualBlock(Bijector):
    """``y = x + g(x)`` over (C, H, W) inputs, g contractive (see the module docstring).

    g is ``[LipSwish] -> conv k_1 -> LipSwish -> conv k_2 -> ... -> conv k_n`` with `hidden`
    channels between the convolutions (Residual Flows' "3-1-3"); `preact=False` drops the first
    activation (the authors' first block). `dense=True` makes g act on the flattened C H W vector
    with linear layers instead (the authors' fully connected blocks; `kernels` then only sets
    the number of layers). `spatial` is (H, W) of the inputs (``spatial: null`` in a config is
    sized by `nfcv.build_layer`): a convolution's operator norm depends on it.
    """

    def __init__(
        self,
        num_channels: int,
        spatial: Sequence[int] | None = None,
        hidden: int = 64,
        kernels: Sequence[int] = (3, 1, 3),
        lipschitz: float = 0.98,
        preact: bool = True,
        dense: bool = False,
        logdet: str = "estimate",
        n_dist: str = "poisson",
        poisson_rate: float = 2.0,
        geometric_p: float = 0.5,
        exact_terms: int = 2,
        neumann_grad: bool = True,
        eval_exact_terms: int = 10,
        eval_probes: int = 2,
        eval_seed: int = 0,
        power_iterations: int = 5,
        eval_power_iterations: int = 20,
        init_power_iterations: int = 10,
        tol: float = 1e-5,
        max_iter: int = 1000,
    ):
        super().__init__()
        lipschitz = float(lipschitz)
        if not 0.0 < lipschitz < 1.0:
            raise ValueError(
                f"lipschitz must be in (0, 1), got {lipschitz}: at or above 1, g is not a "
                "contraction, so x + g(x) may not be invertible and the log-det power series "
                "may diverge; Residual Flows use 0.98"
            )
        if spatial is None or len(spatial) != 2 or min(int(s) for s in spatial) < 1:
            raise ValueError(
                f"spatial must be the inputs' (H, W), got {spatial}: a convolution's operator "
                "norm depends on the image size (nfcv.build_layer fills in `spatial: null`)"
            )
        kernels = [int(k) for k in kernels]
        if not kernels:
            raise ValueError("kernels must list at least one kernel size, e.g. [3, 1, 3]")
        if int(hidden) < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if logdet not in ("estimate", "exact"):
            raise ValueError(f"logdet must be 'estimate' or 'exact', got {logdet!r}")
        if n_dist not in ("poisson", "geometric"):
            raise ValueError(f"n_dist must be 'poisson' or 'geometric', got {n_dist!r}")
        if not poisson_rate > 0 or not 0 < geometric_p < 1:
            raise ValueError(
                f"need poisson_rate > 0 and 0 < geometric_p < 1, got {poisson_rate}, {geometric_p}"
            )
        for name, value, least in (
            ("exact_terms", exact_terms, 0),
            ("eval_exact_terms", eval_exact_terms, 0),
            ("eval_probes", eval_probes, 1),
            ("power_iterations", power_iterations, 1),
            ("eval_power_iterations", eval_power_iterations, 0),
            ("init_power_iterations", init_power_iterations, 1),
            ("max_iter", max_iter, 1),
        ):
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.num_channels = int(num_channels)
        self.spatial = tuple(int(s) for s in spatial)
        self.dense = bool(dense)
        self.preact = bool(preact)
        self.lipschitz = lipschitz
        self.logdet_mode = logdet
        self.n_dist = n_dist
        self.poisson_rate, self.geometric_p = float(poisson_rate), float(geometric_p)
        self.exact_terms, self.eval_exact_terms = int(exact_terms), int(eval_exact_terms)
        self.eval_probes, self.eval_seed = int(eval_probes), int(eval_seed)
        self.neumann_grad = bool(neumann_grad)
        self.power_iterations = int(power_iterations)
        self.eval_power_iterations = int(eval_power_iterations)
        self.tol, self.max_iter = float(tol), int(max_iter)

        if self.dense:
            channels = self.num_channels * self.spatial[0] * self.spatial[1]
            kernels, conv_spatial = [1] * len(kernels), (1, 1)
        else:
            channels, conv_spatial = self.num_channels, self.spatial
        sizes = [channels] + [int(hidden)] * (len(kernels) - 1) + [channels]
        self.convs = nn.ModuleList(
            SpectralNormConv2d(
                sizes[i], sizes[i + 1], k, conv_spatial, lipschitz, init_power_iterations
            )
            for i, k in enumerate(kernels)
        )
        self.acts = nn.ModuleList(LipSwish() for _ in range(len(kernels) - 1 + self.preact))
        # The bound on Lip(g) the inverse's stopping rule uses.
        self.lipschitz_bound = lipschitz ** len(kernels)

    # ------------------------------------------------------------------------------- g itself

    def _weights(self, update: bool) -> list[Tensor]:
        if update:
            return [c.normalised_weight(self.power_iterations, store=True) for c in self.convs]
        return [c.normalised_weight(self.eval_power_iterations, store=False) for c in self.convs]

    def _g(self, x: Tensor, weights: list[Tensor]) -> Tensor:
        h = x.reshape(x.shape[0], -1, 1, 1) if self.dense else x
        a = 0
        for i, (conv, weight) in enumerate(zip(self.convs, weights, strict=True)):
            if i > 0 or self.preact:
                h = self.acts[a](h)
                a += 1
            h = F.conv2d(h, weight, conv.bias, padding=conv.padding)
        return h.reshape(x.shape)

    def g(self, x: Tensor) -> Tensor:
        """g(x) with the weights as evaluation uses them (no power-iteration state changes)."""
        return self._g(x, self._weights(update=False))

    # ----------------------------------------------------------------------------- the series

    def _tail_probability(self, m: int) -> float:
        """P(N >= m) of the roulette's distribution."""
        if m <= 0:
            return 1.0
        if self.n_dist == "geometric":
            return (1.0 - self.geometric_p) ** m
        lam = self.poisson_rate
        term = math.exp(-lam + m * math.log(lam) - math.lgamma(m + 1))
        total, i = 0.0, m
        while term > 1e-300 and (total == 0.0 or term > 1e-17 * total) and i < m + 10000:
            total += term
            i += 1
            term *= lam / i
        return total

    def _draw(self, rng: random.Random | None) -> int:
        u = (rng or random).random()
        if self.n_dist == "geometric":
            return int(math.floor(math.log1p(-u) / math.log1p(-self.geometric_p)))
        # Inversion of the Poisson CDF (exact for the small rates used here).
        k, p = 0, math.exp(-self.poisson_rate)
        cdf = p
        while u > cdf and k < 10000:
            k += 1
            p *= self.poisson_rate / k
            cdf += p
        return k

    def _term_weights(self, tail_counts: Sequence[int], exact: int) -> list[list[float]]:
        """``weights[k - 1][i]``: the factor of series term k for sample i, whose roulette drew
        ``tail_counts[i]``: 1 for the exact terms, then ``1[N_i >= k - exact] / P(N >= k -
        exact)``."""
        n = exact + max(tail_counts)
        out = []
        for k in range(1, n + 1):
            m = k - exact
            if m <= 0:
                out.append([1.0] * len(tail_counts))
            else:
                inv = 1.0 / self._tail_probability(m)
                out.append([inv if c >= m else 0.0 for c in tail_counts])
        return out

    @staticmethod
    def _dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).reshape(a.shape[0], -1).sum(1)

    def _estimate_train(self, gx: Tensor, x: Tensor, keep_graph: bool) -> Tensor:
        n_tail = self._draw(None)
        n = self.exact_terms + n_tail
        coeffs = [w[0] for w in self._term_weights([n_tail], self.exact_terms)]
        probe = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
        if not self.neumann_grad or not keep_graph:
            w, total = probe, x.new_zeros(x.shape[0])
            for k in range(1, n + 1):
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=keep_graph)
                total = total + (-1) ** (k + 1) / k * coeffs[k - 1] * self._dot(w, probe)
            return total
        # Neumann-series gradient: the estimate's value, and the gradient of
        # v^T (sum_(k<n) (-1)^k c_(k+1) J^k) J v, from one differentiable VJP.
        with torch.no_grad():
            w, neumann = probe, torch.zeros_like(probe)
            estimate = x.new_zeros(x.shape[0])
            for k in range(1, n + 1):
                neumann = neumann + (-1) ** (k - 1) * coeffs[k - 1] * w
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True)
                estimate = estimate + (-1) ** (k + 1) / k * coeffs[k - 1] * self._dot(w, probe)
        (surrogate,) = torch.autograd.grad(gx, x, neumann, retain_graph=True, create_graph=True)
        surrogate = self._dot(surrogate, probe)
        return estimate + (surrogate - surrogate.detach())

    def _estimate_eval(self, gx: Tensor, x: Tensor, keep_graph: bool) -> Tensor:
        rng = random.Random(self.eval_seed)
        gen = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        b = x.shape[0]
        total = x.new_zeros(b)
        for _ in range(self.eval_probes):
            counts = [self._draw(rng) for _ in range(b)]
            weights = torch.tensor(
                self._term_weights(counts, self.eval_exact_terms), dtype=x.dtype
            ).to(x.device)
            bits = torch.randint(0, 2, x.shape, generator=gen, device=x.device)
            probe = bits.to(x.dtype) * 2 - 1
            w = probe
            for k in range(1, weights.shape[0] + 1):
                (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=keep_graph)
                total = total + (-1) ** (k + 1) / k * weights[k - 1] * self._dot(w, probe)
        return total / self.eval_probes

    def _exact(self, gx: Tensor, x: Tensor, keep_graph: bool) -> Tensor:
        b, d = x.shape[0], x[0].numel()
        flat = gx.reshape(b, d)
        rows = []
        for i in range(d):  # row i of J_g: d g_i / dx, for every sample at once
            (row,) = torch.autograd.grad(
                flat[:, i].sum(), x, retain_graph=True, create_graph=keep_graph
            )
            rows.append(row.reshape(b, d))
        jac = torch.stack(rows, dim=1)
        eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
        return torch.linalg.slogdet(eye + jac)[1]

    def _g_and_logdet(self, x: Tensor, weights: list[Tensor]) -> tuple[Tensor, Tensor]:
        keep_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
            gx = self._g(x, weights)
            if self.logdet_mode == "exact":
                logdet = self._exact(gx, x, keep_graph)
            elif self.training:
                logdet = self._estimate_train(gx, x, keep_graph)
            else:
                logdet = self._estimate_eval(gx, x, keep_graph)
        if not keep_graph:
            gx, logdet = gx.detach(), logdet.detach()
        return gx, logdet

    def _outside_inference_mode(self, fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor):
        if torch.is_inference_mode_enabled():
            # VJPs need autograd, which inference tensors forbid: leave inference mode (results
            # come back without a graph, as under no_grad).
            with torch.inference_mode(False), torch.no_grad():
                y, logdet = fn(x.clone())
            return y.clone(), logdet.clone()
        return fn(x)

    # ------------------------------------------------------------------------------ Bijector

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        def run(x: Tensor) -> tuple[Tensor, Tensor]:
            with no_autocast(x):
                x = at_least_float32(x)
                gx, logdet = self._g_and_logdet(x, self._weights(update=self.training))
                return x + gx, logdet

        return self._outside_inference_mode(run, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        def run(z: Tensor) -> tuple[Tensor, Tensor]:
            with no_autocast(z):
                z = at_least_float32(z)
                weights = self._weights(update=False)
                x = self._fixed_point(z, weights)
                _, logdet = self._g_and_logdet(x, weights)
                return x, -logdet

        return self._outside_inference_mode(run, z)

    def _fixed_point(self, z: Tensor, weights: list[Tensor]) -> Tensor:
        """x with x + g(x) = z: x_(k+1) = z - g(x_k), a contraction with constant L."""
        lip = self.lipschitz_bound
        factor = lip / (1.0 - lip)
        floor = 16 * torch.finfo(z.dtype).eps
        with torch.no_grad():
            zd = z.detach()
            x = zd - self._g(zd, weights)
            step = None
            for _ in range(self.max_iter):
                x_next = zd - self._g(x, weights)
                step = (x_next - x).reshape(x.shape[0], -1).norm(dim=1)
                scale = x_next.reshape(x.shape[0], -1).norm(dim=1)
                x = x_next
                if bool(((factor * step <= self.tol) | (step <= floor * scale)).all()):
                    return x
        worst = float(step.max()) if step is not None else float("nan")
        raise NumericalError(
            f"ResidualBlock inverse: the fixed-point iteration did not reach tol={self.tol} in "
            f"max_iter={self.max_iter} iterations (last step {worst:.3g}): raise max_iter or "
            f"tol, or lower lipschitz (now {self.lipschitz}) so g contracts faster"
        )

    def output_shape(self, shape: Shape) -> Shape:
        expected = (self.num_channels, *self.spatial)
        if tuple(shape) != expected:
            raise ValueError(
                f"ResidualBlock was built for inputs of shape {expected}, got {tuple(shape)}"
            )
        return tuple(shape)


class ResidualFlow(Levels):
    """Residual Flows' multi-scale image model (Chen et al. 2019, arXiv:1906.02735, appendix;
    rtqichen/residual-flows, ``resflow.py``'s `StackediResBlocks`): per scale, `blocks[i]`
    residual blocks each followed by ActNorm, then a squeeze before the next scale; ActNorm
    first on the input, and the very first block without its leading activation. At the last
    scale `fc_blocks` dense residual blocks follow, each with an ActNorm per position (the
    authors' ActNorm1d). With `factor_out`, half of the channels leave after each squeeze
    (the authors' CIFAR-10 model factors nothing out). The base is N(0, I): no learned priors.

    `block(num_channels, spatial=(H, W), preact=..., dense=...)` builds each residual block
    (a partial `ResidualBlock`); `fc_hidden` is the dense blocks' width.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        block: Callable[..., Bijector],
        blocks: Sequence[int] = (16, 16, 16),
        factor_out: bool = False,
        actnorm: bool = True,
        fc_blocks: int = 4,
        fc_hidden: int = 128,
    ):
        image_shape = tuple(int(s) for s in image_shape)
        blocks = [int(n) for n in blocks]
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        if not blocks or min(blocks) < 0 or fc_blocks < 0:
            raise ValueError(
                f"blocks must list one count >= 0 per scale and fc_blocks be >= 0, got "
                f"blocks={blocks}, fc_blocks={fc_blocks}"
            )
        check_divisible(image_shape, len(blocks) - 1, f"{len(blocks)} scales (model.blocks)")
        bodies: list[Bijector] = []
        shape: Shape = image_shape
        first = True
        for i, n in enumerate(blocks):
            c, h, w = shape
            layers: list[Bijector] = []
            if i == 0 and actnorm:
                layers.append(ActNorm(c))
            for _ in range(n):
                layers.append(block(c, spatial=(h, w), preact=not first))
                first = False
                if actnorm:
                    layers.append(ActNorm(c))
            last = i == len(blocks) - 1
            if last:
                for _ in range(fc_blocks):
                    layers.append(
                        block(c, spatial=(h, w), preact=True, dense=True, hidden=fc_hidden)
                    )
                    if actnorm:
                        layers.append(ActNorm(c, spatial=(h, w)))
            else:
                layers.append(Squeeze())
                shape = (4 * c, h // 2, w // 2)
                if factor_out:
                    shape = (shape[0] - shape[0] // 2, *shape[1:])
            bodies.append(Sequential(layers))
        super().__init__(
            image_shape, bodies, [factor_out and i < len(blocks) - 1 for i in range(len(blocks))]
        )
