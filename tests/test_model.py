"""The whole Glow `ImageFlow` through the public API."""

from __future__ import annotations

import pytest
import torch

import nfcv
from nfcv.errors import ConfigError


def _glow(*overrides: str) -> nfcv.ImageFlow:
    cfg = nfcv.compose(
        ["model=glow", "data=digits", "model.hidden=8", "model.steps=2", *overrides]
    )
    model = nfcv.build_model(cfg)
    model.train()
    x = torch.randint(0, 17, (16, 1, 8, 8))
    model.bits_per_dim(x)  # ActNorm's data-dependent init on a first training batch
    with torch.no_grad():
        for p in model.parameters():  # off the identity start, so the checks mean something
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


VARIANTS = [
    [],
    ["model.coupling=additive"],
    ["model.coupling=spline"],
    # The inverse is bisection: ask for a tolerance below the float64 check's 1e-10.
    ["model.coupling=mixlogcdf", "model.choices.coupling.mixlogcdf.tol=1e-12"],
    ["model.coupling=naf", "model.choices.coupling.naf.tol=1e-12"],
    *[
        [f"model.permutation={p}"]
        for p in ("plain", "triangular", "reverse", "shuffle", "periodic")
    ],
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_public_api_shapes_and_exact_inverse(variant):
    model = _glow(*variant)
    assert model.image_shape == (1, 8, 8)
    assert model.num_bins == 17
    x = torch.rand(4, 1, 8, 8)
    eps, logdet = model.transform(x)
    assert eps.shape == (4, 64) and logdet.shape == (4,)
    # Splines: a nearly flat bin divides the float32 rounding of the forward pass by its slope,
    # so the float32 round trip through the whole model is checked to 5e-4 (float64: 1e-10).
    tol32 = 5e-4 if "model.coupling=spline" in variant else 1e-4
    torch.testing.assert_close(model.inverse(eps), x, atol=tol32, rtol=0)
    model64 = model.double()
    x64 = x.double()
    eps64, _ = model64.transform(x64)
    torch.testing.assert_close(model64.inverse(eps64), x64, atol=1e-10, rtol=0)


def test_log_prob_is_normal_log_density_plus_logdet_and_matches_jacobian():
    model = _glow().double()
    x = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    eps, logdet = model.transform(x)
    jac = torch.autograd.functional.jacobian(
        lambda v: model.transform(v.view(1, 1, 8, 8))[0].reshape(-1), x.reshape(-1)
    )
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=1e-8)
    normal = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(1)
    torch.testing.assert_close(model.log_prob(x), normal + logdet)


def test_gradients_flow_to_inputs():
    model = _glow()
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    model.log_prob(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_sample_shapes_range_and_temperature():
    model = _glow()
    gen = torch.Generator().manual_seed(0)
    s = model.sample(5, temperature=0.7, generator=gen)
    assert s.shape == (5, 1, 8, 8)
    assert s.min() >= 0 and s.max() <= 1
    again = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(s, again)


def test_image_size_not_divisible_names_both_shapes():
    cfg = nfcv.compose(["model=glow", "data=digits", "model.levels=4"])
    with pytest.raises(ConfigError, match=r"\(1, 8, 8\).*2\*\*4 = 16 for levels=4"):
        nfcv.build_model(cfg)


def test_wrong_image_shape_at_call_is_a_clear_error():
    model = _glow()
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 8, 8\)"):
        model.transform(torch.rand(2, 1, 9, 9))
