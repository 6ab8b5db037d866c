"""Bits per dim against hand computations (DESIGN.md's formula)."""

from __future__ import annotations

import math

import pytest
import torch

from nfcv.dequant import Dequantizer
from nfcv.errors import DataRangeError
from nfcv.flows import Bijector, Flatten, Sequential
from nfcv.model import ImageFlow

SHAPE = (1, 2, 3)
D = 6


class NormalQuantile(Bijector):
    """y in (0, 1) -> Phi^-1(y): pushes U(0, 1)^D onto N(0, I), so log p(y) = 0 exactly."""

    def forward(self, x):
        z = torch.special.ndtri(x)
        log_phi = -0.5 * (z * z + math.log(2 * math.pi))
        return z, -log_phi.flatten(1).sum(1)

    def inverse(self, z):
        log_phi = -0.5 * (z * z + math.log(2 * math.pi))
        return torch.special.ndtr(z), log_phi.flatten(1).sum(1)


class FixedNoise(Dequantizer):
    """Deterministic u and a stated log q, for hand computations."""

    def __init__(self, u: float, log_q: float):
        super().__init__()
        self.u, self.log_q = u, log_q

    def forward(self, x_int, num_bins):
        x = x_int.double()
        return (x + self.u) / num_bins, torch.full((x.shape[0],), self.log_q, dtype=x.dtype)


def _images(num_bins, b=5):
    return torch.randint(0, num_bins, (b, *SHAPE))


@pytest.mark.parametrize("num_bins", [2, 17, 256])
@pytest.mark.parametrize("k", [1, 3])
def test_uniform_density_scores_log2_num_bins(num_bins, k):
    model = ImageFlow(Sequential([NormalQuantile(), Flatten(SHAPE)]), SHAPE, num_bins).double()
    bpd = model.bits_per_dim(_images(num_bins), k=k)
    torch.testing.assert_close(bpd, torch.full_like(bpd, math.log2(num_bins)), atol=1e-9, rtol=0)


def test_bits_per_dim_matches_hand_computation():
    num_bins, u, log_q = 17, 0.5, -0.3
    model = ImageFlow(Flatten(SHAPE), SHAPE, num_bins, dequantizer=FixedNoise(u, log_q)).double()
    x = _images(num_bins, b=3)
    bpd = model.bits_per_dim(x)
    for i in range(3):
        y = [(int(v) + u) / num_bins for v in x[i].flatten()]
        log_p = sum(-0.5 * v * v - 0.5 * math.log(2 * math.pi) for v in y)  # identity flow
        expected = -(log_p - log_q - D * math.log(num_bins)) / (D * math.log(2))
        assert bpd[i].item() == pytest.approx(expected, abs=1e-12)


def test_importance_weighted_bound_is_logsumexp_minus_log_k():
    model = ImageFlow(Flatten(SHAPE), SHAPE, 17).double()
    x = _images(17, b=4)
    torch.manual_seed(3)
    bpd = model.bits_per_dim(x, k=5)
    torch.manual_seed(3)
    w = model.log_weights(x.repeat(5, 1, 1, 1)).view(5, 4)  # the same noise draws, in order
    expected = -(torch.logsumexp(w, 0) - math.log(5)) / (D * math.log(2))
    torch.testing.assert_close(bpd, expected, atol=1e-12, rtol=0)
    # Jensen: the k-sample bound is tighter (lower bpd) than the mean of single-sample bounds.
    assert torch.all(bpd <= (-w / (D * math.log(2))).mean(0) + 1e-12)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.full((1, *SHAPE), 17.0), r"\[0, 16\].*got values in \[17, 17\]"),
        (torch.full((1, *SHAPE), -1.0), r"got values in \[-1, -1\]"),
        (torch.full((1, *SHAPE), 0.5), "integers"),
    ],
)
def test_out_of_range_pixels_are_rejected(bad, match):
    model = ImageFlow(Flatten(SHAPE), SHAPE, 17)
    with pytest.raises(DataRangeError, match=match):
        model.bits_per_dim(bad)
