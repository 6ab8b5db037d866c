"""Image grids of samples (kept free of Lightning so nfcv-sample starts fast)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.utils import make_grid

from nfcv.model import ImageFlow


@torch.no_grad()
def sample_grid(
    model: ImageFlow,
    temperatures: Sequence[float],
    n: int,
    nrow: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """`n` samples per temperature laid out `nrow` to a row (default: one row per temperature),
    as a (3, H', W') image grid in [0, 1]. The same seed gives the same grid."""
    nrow = nrow or n
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        blocks = [model.sample(n, temperature=float(t), generator=generator) for t in temperatures]
    finally:
        model.train(was_training)
    return make_grid(torch.cat(blocks).float().cpu(), nrow=nrow, padding=1, pad_value=1.0)
