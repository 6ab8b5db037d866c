"""Bits per dim over a data split: per image, importance weighted, and split into its parts.

For one dequantization sample u of an integer image x (DESIGN.md's formula), with ``eps`` the
latent of ``y = (x + u) / num_bins`` cut into the blocks of ``model.latent_sizes``:

    bpd(x) = sum_l -log N(eps_l; 0, I) / (D ln 2)   latent blocks, first factored-out level first
           + -log|det d eps / dy|      / (D ln 2)   the bijection (preprocessing and priors too)
           + log q(u | x)              / (D ln 2)   dequantization (0 for uniform noise)
           + log2(num_bins)                         discretization: bins are 1/num_bins wide

For a model trained with Gaussian noise augmentation (``model.discrete_bound`` False) the
figure is the continuous ``-log2 p(y) / D`` of the noised image ``y = (x + 1/2) / num_bins +
sigma n``: the parts are the latent blocks and the log-determinant only (no dequantization
density, no discretization term), and k must be 1.

Every part comes from the same forward pass as the total, so they add up to it exactly. With k
samples the total is ``-(logsumexp_k log w_k - log k) / (D ln 2)``; the parts are then averaged
over the k samples and one more part, "importance weighting", is the total minus that average:
never positive (Jensen: the log of a mean is at least the mean of the logs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from nfcv.errors import DataError
from nfcv.model import ImageFlow

LOG_2PI = math.log(2 * math.pi)
LOGDET = "log-determinant"
DEQUANT = "dequantization log q(u|x)"
DISCRETE = "discretization log2(num_bins)"
IMPORTANCE = "importance weighting"


def latent_names(model: ImageFlow) -> list[str]:
    """Names of the latent blocks in `model.latent_sizes` order."""
    sizes = model.latent_sizes
    if len(sizes) == 1:
        return ["latent"]
    names = [f"latent level {i + 1}" for i in range(len(sizes) - 1)]
    return [*names, f"latent level {len(sizes)} (top)"]


@torch.no_grad()
def bits_per_dim_parts(
    model: ImageFlow,
    x_int: Tensor,
    k: int = 1,
    check: bool = True,
    labels: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bits per dim of integer images with `k` dequantization samples, and its parts.

    Returns ``(total, parts)``: float64 tensors of shape (B,) on the model's device, with
    ``sum(parts.values()) == total`` up to float64 rounding. The weights come from
    `ImageFlow.log_weight_passes`, as `ImageFlow.bits_per_dim`'s do, so from the same random
    state both give the same total (up to float32 rounding).
    """
    model.check_inputs(x_int, k, check, labels)
    b = x_int.shape[0]
    to_bits = 1.0 / (model.dim * math.log(2))
    names = latent_names(model)
    discrete = model.discrete_bound  # else Gaussian noise: log q and the discrete term are 0
    sums = {
        name: torch.zeros(b, dtype=torch.float64, device=model.device)
        for name in [*names, LOGDET, *([DEQUANT] if discrete else [])]
    }
    log_w = []
    for m, parts in model.log_weight_passes(x_int, k, labels):
        for name, lp in zip(names, parts.latent, strict=True):
            sums[name] += -lp.double().view(m, b).sum(0) * to_bits
        sums[LOGDET] += -parts.logdet.double().view(m, b).sum(0) * to_bits
        if discrete:
            sums[DEQUANT] += parts.log_q.double().view(m, b).sum(0) * to_bits
        log_w.append(parts.total(torch.float64).view(m, b))
    weights = torch.cat(log_w)  # (k, B), nats
    out = {name: value / k for name, value in sums.items()}
    if discrete:
        out[DISCRETE] = torch.full_like(out[LOGDET], math.log2(model.num_bins))
    if k == 1:
        total = -weights[0] * to_bits
    else:
        total = -(torch.logsumexp(weights, 0) - math.log(k)) * to_bits
        out[IMPORTANCE] = total - (-weights * to_bits).mean(0)
    return total, out


@dataclass
class SplitEvaluation:
    """Per-image results over a split, in loader order (float64, on the CPU)."""

    bpd: Tensor
    parts: dict[str, Tensor]
    labels: Tensor | None
    latent_dims: dict[str, int] = field(default_factory=dict)  # latent part name -> its size

    @property
    def num_images(self) -> int:
        return int(self.bpd.numel())

    def mean(self) -> float:
        return self.bpd.mean().item()

    def stderr(self) -> float:
        """Standard error of the mean over images (the spread of the data, not of the noise)."""
        n = self.num_images
        return (self.bpd.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan

    def breakdown(self) -> list[dict]:
        """One row per part: its mean bits per dim; latent blocks also per own dimension."""
        rows = []
        dim = sum(self.latent_dims.values())
        for name, values in self.parts.items():
            row = {"part": name, "bpd": values.mean().item()}
            if name in self.latent_dims:
                row["dims"] = self.latent_dims[name]
                # The same bits spread over the block's own dimensions instead of all D.
                row["bits_per_own_dim"] = row["bpd"] * dim / row["dims"]
            rows.append(row)
        return rows


def evaluate_split(
    model: ImageFlow,
    batches: Iterable,
    k: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
    total: int | None = None,
    desc: str = "eval",
) -> SplitEvaluation:
    """Bits per dim and its parts for every image `batches` yields (``(images, labels)`` pairs).

    Seed the global RNG first (``torch.manual_seed``) for a reproducible figure: the noise comes
    from it. `total` (number of images) sizes the progress bar.
    """
    values, labels, parts = [], [], {}
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            x, y = (batch[0], batch[1]) if isinstance(batch, list | tuple) else (batch, None)
            cond = y.to(device) if model.num_classes and torch.is_tensor(y) else None
            bpd, batch_parts = bits_per_dim_parts(model, x.to(device), k=k, labels=cond)
            bpd = bpd.cpu()
            bad = torch.nonzero(~torch.isfinite(bpd)).flatten()
            if len(bad):
                first = sum(len(v) for v in values) + int(bad[0])
                raise DataError(
                    f"bits per dim is not finite for image {first} of the split: the model "
                    "gives it zero density (a diverged or damaged checkpoint?)"
                )
            values.append(bpd)
            if y is not None and torch.is_tensor(y):
                labels.append(y.cpu())
            for name, v in batch_parts.items():
                parts.setdefault(name, []).append(v.cpu())
            bar.update(x.shape[0])
    if not values:
        raise DataError("the split has no images")
    return SplitEvaluation(
        bpd=torch.cat(values),
        parts={name: torch.cat(v) for name, v in parts.items()},
        labels=torch.cat(labels) if len(labels) == len(values) else None,
        latent_dims=dict(zip(latent_names(model), model.latent_sizes, strict=True)),
    )
