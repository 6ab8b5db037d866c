"""Image grids of samples, reconstructions and latent interpolations (kept free of Lightning so
nfcv-sample starts fast)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torchvision.utils import make_grid

from nfcv.model import ImageFlow

PATHS = ("spherical", "linear")


@contextmanager
def _eval_mode(model: ImageFlow) -> Iterator[ImageFlow]:
    """Eval mode (no dropout) for the block, then the mode the model had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _grid(images: Tensor, nrow: int) -> Tensor:
    return make_grid(images.float().cpu(), nrow=nrow, padding=1, pad_value=1.0)


@torch.no_grad()
def sample_grid(
    model: ImageFlow,
    temperatures: Sequence[float],
    n: int,
    nrow: int | None = None,
    seed: int = 0,
    label: int | None = None,
    denoise_sigma: float | None = None,
    guidance=None,
) -> Tensor:
    """`n` samples per temperature laid out `nrow` to a row (default: one row per temperature),
    as a (3, H', W') image grid in [0, 1]. The same seed gives the same grid. `label`: the class
    of every sample of a class-conditional model (default: image i is class i % num_classes).
    `denoise_sigma`: denoise each sample by Tweedie's formula (`ImageFlow.denoise`).
    `guidance`: a TarFlow's guided sampling (`nfcv.flows.tarflow.Guidance`)."""
    nrow = nrow or n
    generator = torch.Generator(device=model.device).manual_seed(seed)
    with _eval_mode(model):
        blocks = [
            model.sample(
                n,
                temperature=float(t),
                generator=generator,
                label=label,
                guidance=guidance,
                denoise_sigma=denoise_sigma,
            )
            for t in temperatures
        ]
    return _grid(torch.cat(blocks), nrow)


def bin_centres(model: ImageFlow, x_int: Tensor) -> Tensor:
    """Integer images -> the centres of their bins in [0, 1]: ``(x + 1/2) / num_bins``.

    The deterministic point to encode a real image at: its decode quantises back to the image.
    """
    x = x_int.to(device=model.device, dtype=model.dtype)
    return (x + 0.5) / model.num_bins


def quantise(model: ImageFlow, x: Tensor) -> Tensor:
    """Images in [0, 1] -> integer levels ``floor(x * num_bins)`` in [0, num_bins - 1] (the
    inverse of dequantization ``y = (x + u) / num_bins``)."""
    return (x * model.num_bins).floor().clamp(0, model.num_bins - 1).to(torch.int64)


@torch.no_grad()
def reconstruct(model: ImageFlow, x_int: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, inverse(transform(x)))`` for the bin centres x of integer images."""
    x = bin_centres(model, x_int)
    with _eval_mode(model):
        eps, _ = model.transform(x)
        return x, model.inverse(eps)


def reconstruction_grid(model: ImageFlow, x_int: Tensor, nrow: int = 8) -> tuple[Tensor, float]:
    """Real images and their reconstructions side by side: each row of `nrow` real images is
    followed by the row of their reconstructions. Returns the grid and the largest absolute
    error of a reconstruction (in [0, 1] units; float32 rounding for an exact inverse)."""
    x, x_rec = reconstruct(model, x_int)
    rows = []
    for start in range(0, x.shape[0], nrow):
        real, rec = x[start : start + nrow], x_rec[start : start + nrow].clamp(0, 1)
        # White padding keeps each reconstruction under its image on a partial last row.
        pad = x.new_ones(nrow - real.shape[0], *x.shape[1:])
        rows += [torch.cat([real, pad]), torch.cat([rec, pad])]
    error = (x_rec - x).abs().max().item() if x.numel() else 0.0
    return _grid(torch.cat(rows), nrow), error


def interpolate_latents(a: Tensor, b: Tensor, steps: int, path: str = "spherical") -> Tensor:
    """`steps` points from latent `a` to latent `b` (both (D,)), endpoints included exactly.

    ``spherical``: slerp, which keeps the norm near that of typical Gaussian latents (a straight
    line between two of them passes through low-norm, atypical latents: blurry, grey images);
    ``linear``: the straight line.
    """
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}: use spherical or linear")
    if steps < 2:
        raise ValueError(f"steps must be >= 2 (the two endpoints), got {steps}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64, device=a.device)[:, None]
    a64, b64 = a.double()[None], b.double()[None]
    if path == "spherical":
        cos = torch.dot(a64[0], b64[0]) / (a64.norm() * b64.norm()).clamp_min(1e-300)
        theta = torch.arccos(cos.clamp(-1, 1))
        if theta.item() > 1e-6:  # else (nearly) parallel: slerp degenerates to the line
            sin = torch.sin(theta)
            out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / sin
            out[0], out[-1] = a64[0], b64[0]  # exact endpoints despite sin/sin rounding
            return out.to(a.dtype)
    out = (1 - t) * a64 + t * b64
    out[0], out[-1] = a64[0], b64[0]
    return out.to(a.dtype)


@torch.no_grad()
def interpolation_grid(
    model: ImageFlow,
    x_int: Tensor,
    steps: int = 8,
    path: str = "spherical",
    denoise_sigma: float | None = None,
) -> tuple[Tensor, float]:
    """Encode the bin centres of two or more real images and decode the latent path between
    each consecutive pair: one row of `steps` images per pair, its first and last the encoded
    images. Returns the grid and the largest absolute error of an endpoint against its image
    (before denoising). `denoise_sigma`: denoise the decoded images (`ImageFlow.denoise`)."""
    if x_int.shape[0] < 2:
        raise ValueError(f"interpolation needs at least 2 images, got {x_int.shape[0]}")
    x = bin_centres(model, x_int)
    with _eval_mode(model):
        eps, _ = model.transform(x)
        rows, error = [], 0.0
        for i in range(x.shape[0] - 1):
            decoded = model.inverse(interpolate_latents(eps[i], eps[i + 1], steps, path))
            error = max(
                error,
                (decoded[0] - x[i]).abs().max().item(),
                (decoded[-1] - x[i + 1]).abs().max().item(),
            )
            if denoise_sigma is not None:
                decoded = model.denoise(decoded, denoise_sigma)
            rows.append(decoded.clamp(0, 1))
    return _grid(torch.cat(rows), steps), error


@torch.no_grad()
def draw_samples(
    model: ImageFlow,
    temperatures: Sequence[float],
    n: int,
    batch_size: int = 256,
    seed: int = 0,
    denoise_sigma: float | None = None,
    guidance=None,
) -> tuple[Tensor, Tensor]:
    """`n` samples per temperature, `batch_size` at a time (bounded memory for the thousands a
    metric needs): ``(images (N, C, H, W) in [0, 1] on the CPU, temperature of each (N,))``.
    The same seed and batch size give the same samples. `denoise_sigma`: denoise each sample
    by Tweedie's formula (`ImageFlow.denoise`)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    images, temps = [], []
    with _eval_mode(model):
        for t in temperatures:
            for start in range(0, n, batch_size):
                m = min(batch_size, n - start)
                images.append(
                    model.sample(
                        m,
                        temperature=float(t),
                        generator=generator,
                        guidance=guidance,
                        denoise_sigma=denoise_sigma,
                    ).cpu()
                )
                temps.append(torch.full((m,), float(t)))
    return torch.cat(images), torch.cat(temps)
