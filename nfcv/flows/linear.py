"""Linear flows beyond 1x1 convolutions: elementwise (diagonal) scaling, as in NICE (Dinh et al.
2014, arXiv:1410.8516, section 3.3); the periodic convolution computed in the Fourier domain
(Hoogeboom et al. 2019, arXiv:1901.11137, section 3.2; Karami et al. 2019, arXiv:1905.10170); the
emerging convolution, two autoregressive convolutions (arXiv:1901.11137, section 3.1); and a
dense linear map over the whole input (Papamakarios et al. 2021, arXiv:1912.02762, section 3.1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows import exact
from nfcv.flows.base import (
    Bijector,
    at_least_float32,
    check_channels,
    no_autocast,
    zero_logdet,
)
from nfcv.flows.conv1x1 import InvConv1x1LU


class DiagAffine(Bijector):
    """``z = x * exp(log_scale) + shift`` with one scale and shift per channel and position of a
    `height` x `width` grid (1 x 1: per channel, broadcast over space). NICE's final scaling
    layer is this on a flattened image, shape (D, 1, 1). Starts as the identity; log-det
    ``sum(log_scale)`` per position."""

    def __init__(self, num_channels: int, height: int = 1, width: int = 1):
        super().__init__()
        self.num_channels = num_channels
        self.log_scale = nn.Parameter(torch.zeros(1, num_channels, height, width))
        self.shift = nn.Parameter(torch.zeros(1, num_channels, height, width))

    def _logdet(self, x: Tensor) -> Tensor:
        per_position = self.log_scale.expand(1, *x.shape[1:]).sum()
        return per_position.expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale) + self.shift, self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return (z - self.shift) * torch.exp(-self.log_scale), -self._logdet(z)

    def output_shape(self, shape):
        shape = check_channels(self, shape, self.num_channels)
        h, w = self.log_scale.shape[2:]
        if (h, w) != (1, 1) and (h, w) != tuple(shape[1:]):
            raise ValueError(f"DiagAffine was built for {h}x{w} positions, got shape {shape}")
        return shape


class PeriodicConv(Bijector):
    """Invertible k x k convolution with periodic (circular) boundaries, channel-mixing.

    In the Fourier domain a circular convolution is one C x C matrix per frequency, so the
    log-det is ``sum_(u,v) log|det K(u,v)|`` and the inverse is a solve per frequency:
    O(C^2 D + C D log D) to apply, O(C^3 H W) for the log-det and inverse, both in complex128.
    The kernel starts as the identity (a 1 at the centre tap of each channel's own filter).
    """

    def __init__(self, num_channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.num_channels = num_channels
        self.kernel_size = kernel_size
        weight = torch.zeros(num_channels, num_channels, kernel_size, kernel_size)
        weight[:, :, kernel_size // 2, kernel_size // 2] = torch.eye(num_channels)
        self.weight = nn.Parameter(weight)

    def _spectrum(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        """K(u, v), shape (H, W, C, C), complex in `dtype`'s precision (complex64 for float32):
        the DFT of the kernel laid on the H x W torus with its centre tap at (0, 0) (taps wrap
        around on inputs smaller than the kernel)."""
        k, r = self.kernel_size, self.kernel_size // 2
        c = self.num_channels
        torus = self.weight.new_zeros(c, c, height * width, dtype=dtype)
        offsets = torch.arange(k, device=self.weight.device) - r
        rows = (offsets % height)[:, None] * width + (offsets % width)[None, :]
        torus = torus.index_add(2, rows.reshape(-1), self.weight.to(dtype).reshape(c, c, -1))
        # Cross-correlation (as conv2d computes it) is convolution with the flipped kernel:
        # conjugating the transform of the unflipped one.
        spectrum = torch.fft.fft2(torus.view(c, c, height, width)).conj()
        return spectrum.permute(2, 3, 0, 1)

    def _convolve(self, x: Tensor, matrices: Tensor) -> Tensor:
        xf = torch.fft.fft2(x.to(matrices.real.dtype))
        yf = torch.einsum("hwij,bjhw->bihw", matrices, xf)
        return torch.fft.ifft2(yf).real.to(x.dtype)

    def _logdet(self, spectrum: Tensor, x: Tensor) -> Tensor:
        return torch.linalg.slogdet(spectrum)[1].sum().to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # In the input's precision (float32 in training); the inverse, for sampling, in float64.
        r = self.kernel_size // 2
        with no_autocast(x):
            x = at_least_float32(x)
            spectrum = self._spectrum(x.shape[2], x.shape[3], x.dtype)
            if r < min(x.shape[2], x.shape[3]):
                # The direct circular convolution equals the Fourier product (tested), and is
                # cheaper; in full float32 whatever the TF32 settings (`nfcv.flows.exact`).
                padded = F.pad(x, (r, r, r, r), mode="circular")
                z = exact.conv2d(padded, self.weight.to(x.dtype))
            else:
                z = self._convolve(x, spectrum)
        return z, self._logdet(spectrum, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(z):
            z = at_least_float32(z)
            spectrum = self._spectrum(z.shape[2], z.shape[3], torch.float64)
            x = self._convolve(z, torch.linalg.inv(spectrum))
        return x, -self._logdet(spectrum, z)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)


# A dense map over the whole per-sample tensor holds two d x d factors (2 * 4096^2 floats =
# 128 MiB of parameters, and as much again for each of Adam's moments): beyond this, image-sized
# inputs want a per-pixel or convolutional linear flow.
MAX_FULL_LINEAR_DIM = 4096


class FullLinear(Bijector):
    """A dense invertible d x d map over the whole per-sample tensor, ``z = W x`` with
    d = C * prod(spatial): the "full" linear flow of Papamakarios et al. 2021
    (arXiv:1912.02762, section 3.1), LU-parameterised as Glow's 1x1 convolution
    (arXiv:1807.03039, section 3.2): ``W = L (U + diag(exp(log_s)))``, L unit lower and U
    strictly upper triangular, so W is invertible by construction and log|det W| = sum(log_s).

    The factors are applied one after the other, never multiplied out: forward O(d^2) per
    sample, log-det O(d), inverse two triangular solves, O(d^2) per sample (in float64). A plain
    W would need an O(d^3) slogdet at every step. It starts as the identity (P = I, positive
    signs), not at the LU factors of a random rotation as Glow's 1x1 convolutions do: at
    d = 64 those factors alone have condition numbers near 100, and the float32 round trip
    through them loses the 1e-4 a flow's inverse is held to.

    `spatial` is the per-sample shape after the channels: (H, W) for images, () or None for
    flat (d,) vectors (NICE's). The catalogue's ``build_layer`` sizes it to its input.
    """

    def __init__(self, num_channels: int, spatial: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        self.shape = (int(num_channels), *(int(s) for s in (spatial or ())))
        dim = math.prod(self.shape)
        if dim > MAX_FULL_LINEAR_DIM:
            raise ValueError(
                f"full_linear over the per-sample shape {self.shape} is a dense {dim} x {dim} "
                f"matrix; the limit is d = C*H*W <= {MAX_FULL_LINEAR_DIM} (e.g. 1x8x8 digits, "
                "3x32x32 at most). For larger images use a per-pixel channel mixing (invconv_lu, "
                "block_diag) or a convolution (emerging_conv, periodic_conv)"
            )
        self.dim = dim
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.upper = nn.Parameter(torch.zeros(dim, dim))
        self.log_s = nn.Parameter(torch.zeros(dim))

    def _factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """L (unit lower) and U (upper, with the learned diagonal) in `dtype`; tril/triu mask
        the learned entries outside each triangle, and their gradients."""
        eye = torch.eye(self.dim, dtype=dtype, device=self.lower.device)
        lower = torch.tril(self.lower.to(dtype), -1) + eye
        upper = torch.triu(self.upper.to(dtype), 1) + torch.diag(self.log_s.to(dtype).exp())
        return lower, upper

    def _logdet(self, x: Tensor) -> Tensor:
        return self.log_s.sum().to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(x):
            x = at_least_float32(x)
            lower, upper = self._factors(x.dtype)
            # Row vectors: (L U x)^T = x^T U^T L^T, in full float32 (`nfcv.flows.exact`).
            z = exact.matmul(exact.matmul(x.reshape(x.shape[0], -1), upper.T), lower.T)
        return z.reshape(x.shape), self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(z):
            z = at_least_float32(z)
            lower, upper = self._factors(torch.float64)
            rhs = z.reshape(z.shape[0], -1).double().T  # (d, B)
            v = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
            x = torch.linalg.solve_triangular(upper, v, upper=True).T.to(z.dtype)
        return x.reshape(z.shape), -self._logdet(z)

    def output_shape(self, shape):
        if tuple(shape) != self.shape:
            raise ValueError(
                f"FullLinear was built for per-sample inputs of shape {self.shape} (d = "
                f"{self.dim}), got {tuple(shape)}"
            )
        return tuple(shape)


class EmergingConv(Bijector):
    """Emerging convolution (Hoogeboom, van den Berg & Welling 2019, arXiv:1901.11137, section
    3.1): an invertible k x k convolution made of two autoregressive convolutions, after an
    LU-parameterised 1x1 convolution (`conv1x1`, as in the authors' code, so the channel order
    of the triangular centre taps is learned too).

    Each factor is an s x s convolution, s = (k + 1) / 2, whose tap on the output's own pixel
    is a corner: the first reads the pixels above and to the left (its Jacobian is lower
    triangular in raster order, channel last), the second, its mirror image, the pixels below
    and to the right (upper triangular). Their composition sees a k x k neighbourhood. The own-
    pixel taps are triangular C x C matrices whose diagonals are ``exp(log_diag)``, so the
    layer is invertible by construction and its log-det is ``H W (sum(log_diag_lower) +
    sum(log_diag_upper))`` plus the 1x1 convolution's: O(C) (the paper's "log-det from the
    diagonals"). Both convolutions start as the identity.

    The inverse solves the two triangular systems in turn (upper, then lower): pixel (i, j)
    depends only on pixels of smaller (larger) i + j, so ``H + W - 1`` sweeps of ``x <- D^-1
    (y - N x)`` (N the off-centre taps, D the centre one) are exact, each sweep a whole-image
    convolution and a triangular solve per pixel, in float64: O(C^2 k^2 D (H + W)).
    """

    def __init__(self, num_channels: int, kernel_size: int = 3, conv1x1: bool = True):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"emerging_conv kernel_size must be odd and >= 1 (the two autoregressive "
                f"factors are (k+1)/2 x (k+1)/2 each), got {kernel_size}"
            )
        c = self.num_channels = int(num_channels)
        self.kernel_size = int(kernel_size)
        s = self.factor_size = (self.kernel_size + 1) // 2
        self.mixing = InvConv1x1LU(c) if conv1x1 else None
        self.weight_lower = nn.Parameter(torch.zeros(c, c, s, s))
        self.weight_upper = nn.Parameter(torch.zeros(c, c, s, s))
        self.log_diag_lower = nn.Parameter(torch.zeros(c))
        self.log_diag_upper = nn.Parameter(torch.zeros(c))
        # The lower factor's taps: every channel pair off the own-pixel tap (the bottom-right
        # corner), strictly lower channel pairs on it (its diagonal is exp(log_diag_lower)).
        mask = torch.ones(c, c, s, s)
        mask[:, :, s - 1, s - 1] = torch.tril(torch.ones(c, c), -1)
        corner = torch.zeros(s, s)
        corner[s - 1, s - 1] = 1.0
        # The upper factor is the lower one reversed in every axis: the own-pixel tap at the top
        # left corner and strictly upper in channels. Derived from the shape: not saved.
        self.register_buffer("mask_lower", mask, persistent=False)
        self.register_buffer("mask_upper", mask.flip(0, 1, 2, 3), persistent=False)
        self.register_buffer("corner_lower", corner, persistent=False)
        self.register_buffer("corner_upper", corner.flip(0, 1), persistent=False)

    def _kernels(self, dtype: torch.dtype, which: str) -> tuple[Tensor, Tensor]:
        """The `which` ("lower" or "upper") factor's full kernel, and the kernel without its
        own-pixel tap (what the inverse's sweeps move to the right-hand side)."""
        weight = getattr(self, f"weight_{which}").to(dtype)
        log_diag = getattr(self, f"log_diag_{which}").to(dtype)
        corner = getattr(self, f"corner_{which}").to(dtype)
        masked = weight * getattr(self, f"mask_{which}").to(dtype)
        full = masked + torch.diag(log_diag.exp())[:, :, None, None] * corner
        return full, masked * (1 - corner)

    def _pad(self, which: str) -> tuple[int, int, int, int]:
        r = self.factor_size - 1  # F.pad order: left, right, top, bottom
        return (r, 0, r, 0) if which == "lower" else (0, r, 0, r)

    def _conv(self, x: Tensor, which: str) -> Tensor:
        """One autoregressive factor: zero padding on the side it reads from."""
        return exact.conv2d(F.pad(x, self._pad(which)), self._kernels(x.dtype, which)[0])

    def _solve(self, y: Tensor, which: str) -> Tensor:
        """x with ``_conv(x, which) = y``, in float64 (see the class docstring)."""
        b, c, h, w = y.shape
        y = y.double()
        full, off = self._kernels(torch.float64, which)
        centre = full[:, :, -1, -1] if which == "lower" else full[:, :, 0, 0]
        x = torch.zeros_like(y)
        for _ in range(h + w - 1):
            rhs = y - F.conv2d(F.pad(x, self._pad(which)), off)
            rhs = rhs.transpose(0, 1).reshape(c, -1)
            x = torch.linalg.solve_triangular(centre, rhs, upper=which == "upper")
            x = x.reshape(c, b, h, w).transpose(0, 1)
        return x

    def _logdet(self, x: Tensor) -> Tensor:
        per_pixel = self.log_diag_lower.sum() + self.log_diag_upper.sum()
        return (x.shape[2] * x.shape[3] * per_pixel).to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = zero_logdet(x)
        if self.mixing is not None:
            x, logdet = self.mixing(x)
        with no_autocast(x):
            x = at_least_float32(x)
            z = self._conv(self._conv(x, "lower"), "upper")
        return z, logdet + self._logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with no_autocast(z):
            z = at_least_float32(z)
            x = self._solve(self._solve(z, "upper"), "lower").to(z.dtype)
        logdet = -self._logdet(z)
        if self.mixing is not None:
            x, mixing_logdet = self.mixing.inverse(x)
            logdet = logdet + mixing_logdet
        return x, logdet

    def output_shape(self, shape):
        shape = check_channels(self, shape, self.num_channels)
        h, w = shape[1:]
        if self.factor_size > min(h, w):
            raise ValueError(
                f"emerging_conv kernel_size={self.kernel_size} does not fit the {h}x{w} input "
                f"of shape {tuple(shape)}: its outermost taps, {self.factor_size - 1} pixels from "
                f"the centre, would read only the zero padding. Use an odd kernel_size <= "
                f"{2 * min(h, w) - 1} (2 min(H, W) - 1), e.g. "
                "model.choices.permutation.emerging.kernel_size=..., or fewer levels"
            )
        return shape
