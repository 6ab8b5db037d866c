"""Invertible 1x1 convolutions (Glow, Kingma & Dhariwal 2018, arXiv:1807.03039, section 3.2)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from nfcv.errors import NumericalError
from nfcv.flows import exact
from nfcv.flows.base import Bijector, at_least_float32, check_channels, no_autocast

# A plain (not LU) 1x1 conv is reported when |det W| falls below this: its inverse then amplifies
# float32 rounding by a factor of the order of 1/|det| (LU convs cannot get there unnoticed:
# their log|s| is the parameter).
MIN_ABS_DET = 1e-6


def _random_rotation(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A random orthogonal matrix (log|det| = 0): Glow's initialisation."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    return q


def _inverse(w: Tensor) -> Tensor:
    """W^-1; the pseudo-inverse for an exactly singular W (already reported by
    `_check_invertible`), so that sample grids during training do not stop the run."""
    inverse, info = torch.linalg.inv_ex(w)
    return torch.linalg.pinv(w) if bool(info.any()) else inverse


def _mix_channels(w: Tensor, x: Tensor) -> Tensor:
    """The 1x1 convolution ``w`` (C, C) applied to ``x`` (N, C, H, W), in full float32 whatever
    the process's TF32 settings (`nfcv.flows.exact`)."""
    return exact.conv2d(x, w[:, :, None, None])


class _Conv1x1Base(Bijector):
    # What inverting a (nearly) singular matrix does: "warn" (training: the sample grids must
    # not stop a run) or "raise" a `NumericalError` (models from `nfcv.load`: eval, sampling).
    singular = "warn"
    min_abs_det = MIN_ABS_DET
    layer_name: str | None = None  # its path in the model (`name_layers`), for the report

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels
        self._inv_cache: tuple[tuple, Tensor] | None = None

    def _check_invertible(self, log_abs_det: Tensor) -> None:
        """Report a matrix whose |det| is below `min_abs_det` instead of inverting it silently."""
        worst = float(log_abs_det.detach().min())
        if worst >= math.log(self.min_abs_det):
            return
        name = self.layer_name or type(self).__name__
        message = (
            f"1x1 convolution {name}: |det W| = {math.exp(worst):.3g} is below "
            f"{self.min_abs_det:g}, so W is (nearly) singular and its inverse is unreliable"
        )
        if self.singular == "raise":
            raise NumericalError(
                f"{message}: the model cannot be inverted (sampling, reconstructions). Train "
                "with model.permutation=lu, whose 1x1 convolutions stay invertible"
            )
        warnings.warn(f"{message} (model.permutation=lu avoids it)", RuntimeWarning, stacklevel=4)

    def weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _weight_inverse64(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def log_abs_det(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse_weight(self, dtype: torch.dtype) -> Tensor:
        """W^-1, computed in float64; cached while no parameter changes (sampling in eval mode)."""
        # Version counters change on in-place updates (optimizer steps, load_state_dict), data
        # pointers on moves between devices; writes through `.data` bypass both, so don't.
        key = (tuple((p._version, p.data_ptr()) for p in self.parameters()), dtype)
        if (
            not torch.is_grad_enabled()
            and self._inv_cache is not None
            and self._inv_cache[0] == key
        ):
            return self._inv_cache[1]
        w_inv = self._weight_inverse64().to(dtype)
        if not torch.is_grad_enabled():
            self._inv_cache = (key, w_inv)
        return w_inv

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(x):
            x = at_least_float32(x)
            z = _mix_channels(self.weight().to(x.dtype), x)
        logdet = (x.shape[2] * x.shape[3]) * self.log_abs_det().to(x.dtype)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(z):
            z = at_least_float32(z)
            x = _mix_channels(self.inverse_weight(z.dtype), z)
        logdet = -(z.shape[2] * z.shape[3]) * self.log_abs_det().to(z.dtype)
        return x, logdet.expand(z.shape[0])

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)


class InvConv1x1(_Conv1x1Base):
    """Plain invertible 1x1 convolution: a learned C x C matrix, log|det W| by slogdet in the
    parameters' dtype (float32 in training; the float64 inverse is for sampling)."""

    def __init__(self, num_channels: int):
        super().__init__(num_channels)
        self.w = nn.Parameter(_random_rotation(num_channels).float())

    def weight(self) -> Tensor:
        return self.w

    def _weight_inverse64(self) -> Tensor:
        w = self.w.double()
        self._check_invertible(torch.linalg.slogdet(w)[1])
        return _inverse(w)

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.w)[1]


class InvConv1x1LU(_Conv1x1Base):
    """LU-parameterised 1x1 convolution, ``W = P L (U + diag(sign(s) * exp(log|s|)))``.

    P and sign(s) are fixed buffers taken from the LU factorisation of a random rotation; L (unit
    lower), U (strictly upper) and log|s| are learned, so log|det W| = sum(log|s|) costs O(C) and
    W stays invertible by construction.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_channels)
        p, lower, upper = torch.linalg.lu(_random_rotation(num_channels))
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        # Unused since `_factors` masks with tril/triu; kept so that checkpoints saved with it
        # still load (state dicts are loaded strictly).
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.register_buffer("eye", torch.eye(num_channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """P, L and U in `dtype`: the learned entries outside each triangle are masked out
        (`tril`/`triu`, which also mask their gradients). One path for the weight (each
        training step) and the float64 inverse."""
        lower = torch.tril(self.lower.to(dtype), -1) + self.eye.to(dtype)
        upper = torch.triu(self.upper.to(dtype), 1) + torch.diag(
            self.sign_s.to(dtype) * self.log_s.to(dtype).exp()
        )
        return self.perm.to(dtype), lower, upper

    def weight(self) -> Tensor:
        p, lower, upper = self._factors(self.lower.dtype)
        return exact.matmul(p, exact.matmul(lower, upper))  # TF32 would round W itself

    def _weight_inverse64(self) -> Tensor:
        p, lower, upper = self._factors(torch.float64)
        eye = torch.eye(self.num_channels, dtype=torch.float64, device=p.device)
        lower_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        return upper_inv @ lower_inv @ p.T

    def log_abs_det(self) -> Tensor:
        return self.log_s.sum()


class Triangular1x1(_Conv1x1Base):
    """Lower-triangular channel mixing with a positive diagonal, ``W = L + diag(exp(d))``.

    A linear flow whose log-det costs O(C) (the diagonal) and whose inverse is a triangular solve
    (the linear-flow family of Papamakarios et al. 2021, arXiv:1912.02762, section 3.1). Starts as
    the identity.
    """

    def __init__(self, num_channels: int):
        super().__init__(num_channels)
        self.lower = nn.Parameter(torch.zeros(num_channels, num_channels))
        self.log_diag = nn.Parameter(torch.zeros(num_channels))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))

    def _matrix(self, dtype: torch.dtype) -> Tensor:
        return self.lower.to(dtype) * self.lower_mask.to(dtype) + torch.diag(
            torch.exp(self.log_diag.to(dtype))
        )

    def weight(self) -> Tensor:
        return self._matrix(self.lower.dtype)

    def _weight_inverse64(self) -> Tensor:
        m = self._matrix(torch.float64)
        eye = torch.eye(self.num_channels, dtype=torch.float64, device=m.device)
        return torch.linalg.solve_triangular(m, eye, upper=False)

    def log_abs_det(self) -> Tensor:
        return self.log_diag.sum()


class BlockInvConv1x1(_Conv1x1Base):
    """`groups` independent C/groups x C/groups invertible 1x1 convolutions, one per block of
    channels: Flow++'s "Pointwise" layer applied to each half of a split (arXiv:1902.00275 code),
    initialised as the identity plus N(0, `init_noise`^2) noise. log|det| by slogdet of each block
    in the parameters' dtype."""

    def __init__(self, num_channels: int, groups: int = 2, init_noise: float = 1e-3):
        super().__init__(num_channels)
        if groups < 1 or num_channels % groups:
            fits = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
            raise ValueError(
                f"block-diagonal 1x1 conv (BlockInvConv1x1): {num_channels} channels do not "
                f"split into groups={groups} blocks of equal size; groups must divide the "
                f"channel count: one of {fits}"
            )
        self.groups = groups
        c = num_channels // groups
        self.w = nn.Parameter(
            torch.eye(c).repeat(groups, 1, 1) + init_noise * torch.randn(groups, c, c)
        )

    def weight(self) -> Tensor:
        return self.w

    def _weight_inverse64(self) -> Tensor:
        w = self.w.double()
        self._check_invertible(torch.linalg.slogdet(w)[1])  # each block on its own
        return _inverse(w)

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.w)[1].sum()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(x):
            x = at_least_float32(x)
            w = self.w.to(x.dtype).reshape(self.num_channels, -1, 1, 1)
            z = exact.conv2d(x, w, 0, self.groups)
        logdet = (x.shape[2] * x.shape[3]) * self.log_abs_det().to(x.dtype)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(z):
            z = at_least_float32(z)
            w_inv = self.inverse_weight(z.dtype).reshape(self.num_channels, -1, 1, 1)
            x = exact.conv2d(z, w_inv, 0, self.groups)
        logdet = -(z.shape[2] * z.shape[3]) * self.log_abs_det().to(z.dtype)
        return x, logdet.expand(z.shape[0])


def name_layers(root: nn.Module, singular: str | None = None) -> None:
    """Give every 1x1 conv of `root` its path in the model (named in reports) and, if given,
    the `singular` policy ("warn" or "raise")."""
    for name, module in root.named_modules():
        if isinstance(module, _Conv1x1Base):
            module.layer_name = name or type(module).__name__
            if singular is not None:
                module.singular = singular
