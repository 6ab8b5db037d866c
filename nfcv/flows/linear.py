"""Linear flows beyond 1x1 convolutions: elementwise (diagonal) scaling, as in NICE (Dinh et al.
2014, arXiv:1410.8516, section 3.3), and the periodic convolution computed in the Fourier domain
(Hoogeboom et al. 2019, arXiv:1901.11137, section 3.2; Karami et al. 2019, arXiv:1905.10170)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nfcv.flows.base import Bijector, check_channels


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

    def _spectrum(self, height: int, width: int) -> Tensor:
        """K(u, v), shape (H, W, C, C), complex128: the DFT of the kernel laid on the H x W torus
        with its centre tap at (0, 0) (taps wrap around on inputs smaller than the kernel)."""
        k, r = self.kernel_size, self.kernel_size // 2
        c = self.num_channels
        torus = self.weight.new_zeros(c, c, height * width, dtype=torch.float64)
        offsets = torch.arange(k, device=self.weight.device) - r
        rows = (offsets % height)[:, None] * width + (offsets % width)[None, :]
        torus = torus.index_add(
            2, rows.reshape(-1), self.weight.to(torch.float64).reshape(c, c, -1)
        )
        # Cross-correlation (as conv2d computes it) is convolution with the flipped kernel:
        # conjugating the transform of the unflipped one.
        spectrum = torch.fft.fft2(torus.view(c, c, height, width)).conj()
        return spectrum.permute(2, 3, 0, 1)

    def _convolve(self, x: Tensor, matrices: Tensor) -> Tensor:
        xf = torch.fft.fft2(x.to(torch.float64))
        yf = torch.einsum("hwij,bjhw->bihw", matrices, xf)
        return torch.fft.ifft2(yf).real.to(x.dtype)

    def _logdet(self, spectrum: Tensor, x: Tensor) -> Tensor:
        return torch.linalg.slogdet(spectrum)[1].sum().to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        r = self.kernel_size // 2
        spectrum = self._spectrum(x.shape[2], x.shape[3])
        if r < min(x.shape[2], x.shape[3]):
            # The direct circular convolution equals the Fourier product (tested), and is cheaper.
            z = F.conv2d(F.pad(x, (r, r, r, r), mode="circular"), self.weight.to(x.dtype))
        else:
            z = self._convolve(x, spectrum)
        return z, self._logdet(spectrum, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        spectrum = self._spectrum(z.shape[2], z.shape[3])
        return self._convolve(z, torch.linalg.inv(spectrum)), -self._logdet(spectrum, z)

    def output_shape(self, shape):
        return check_channels(self, shape, self.num_channels)
