"""The linear flows of the catalogue beyond 1x1 convolutions: `full_linear`, `block_diag` and
`emerging_conv` (arXiv:1901.11137): their build-time errors, the emerging convolution's
triangular factors, and Glow and NICE with them. Inverse and log-det against the brute-force
Jacobian: tests/test_layers.py, which runs every catalogue name."""

from __future__ import annotations

import pytest
import torch

import nfcv
from nfcv.flows import BlockInvConv1x1, EmergingConv, FullLinear
from nfcv.flows.linear import MAX_FULL_LINEAR_DIM

NAMES = ("full_linear", "block_diag", "emerging_conv")


def _perturb(layer: torch.nn.Module, scale: float = 0.2) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer


def _jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape[1:]
    return torch.autograd.functional.jacobian(
        lambda v: fn(v.view(1, *shape)).reshape(-1), x.reshape(-1)
    )


def test_the_three_are_catalogue_layers():
    # tests/test_layers.py parametrizes over layer_names(): these get its inverse, log-det and
    # learning checks.
    assert set(NAMES) <= set(nfcv.layer_names())
    assert isinstance(nfcv.build_layer("full_linear", (1, 8, 8)), FullLinear)
    assert isinstance(nfcv.build_layer("block_diag", (4, 4, 4)), BlockInvConv1x1)
    assert isinstance(nfcv.build_layer("emerging_conv", (4, 4, 4)), EmergingConv)


def test_full_linear_is_sized_to_its_input_and_dense():
    layer = _perturb(nfcv.build_layer("full_linear", (1, 8, 8))).double()
    assert layer.shape == (1, 8, 8) and layer.dim == 64
    jac = _jacobian(lambda v: layer(v)[0], torch.randn(1, 1, 8, 8, dtype=torch.float64))
    assert (jac != 0).float().mean() > 0.9  # every output mixes (nearly) every input
    with pytest.raises(ValueError, match=r"built for per-sample inputs of shape \(1, 8, 8\)"):
        layer.output_shape((1, 4, 16))
    # Flat vectors (NICE's): spatial () or None.
    assert FullLinear(10).output_shape((10,)) == (10,)


def test_full_linear_refuses_a_dimension_too_large_for_a_dense_matrix():
    side = 64  # 3 x 64 x 64 = 12288 > 4096
    with pytest.raises(ValueError, match=r"\(3, 64, 64\).*12288 x 12288.*4096.*invconv_lu"):
        nfcv.build_layer("full_linear", (3, side, side))
    assert MAX_FULL_LINEAR_DIM >= 3 * 32 * 32  # CIFAR-sized inputs still fit


@pytest.mark.parametrize(("channels", "groups"), [(6, 4), (5, 2), (4, 0)])
def test_block_diag_refuses_a_group_count_that_does_not_divide_the_channels(channels, groups):
    with pytest.raises(ValueError, match=rf"{channels} channels do not split into groups="):
        nfcv.build_layer("block_diag", (channels, 4, 4), groups=groups)


def test_block_diag_jacobian_is_block_diagonal_over_channels():
    layer = _perturb(nfcv.build_layer("block_diag", (6, 1, 1), groups=3)).double()
    jac = _jacobian(lambda v: layer(v)[0], torch.randn(1, 6, 1, 1, dtype=torch.float64))
    blocks = torch.block_diag(*[torch.ones(2, 2, dtype=torch.bool)] * 3)
    assert torch.all(jac[~blocks] == 0) and torch.all(jac[blocks] != 0)


@pytest.mark.parametrize("kernel_size", [0, 2, 4, -1])
def test_emerging_refuses_an_even_or_nonpositive_kernel(kernel_size):
    with pytest.raises(ValueError, match=f"kernel_size must be odd.*got {kernel_size}"):
        nfcv.build_layer("emerging_conv", (4, 4, 4), kernel_size=kernel_size)


def test_emerging_refuses_a_kernel_larger_than_the_image():
    # 2x2 takes k = 3 (taps 1 pixel off the centre), not 5: its outer taps would only ever
    # read the zero padding.
    nfcv.build_layer("emerging_conv", (4, 2, 2), kernel_size=3)
    with pytest.raises(ValueError, match=r"kernel_size=5 does not fit the 2x2 input.*<= 3"):
        nfcv.build_layer("emerging_conv", (4, 2, 2), kernel_size=5)
    with pytest.raises(ValueError, match=r"kernel_size=3 does not fit the 1x4 input"):
        nfcv.build_layer("emerging_conv", (4, 1, 4), kernel_size=3)


def _raster(c: int, h: int, w: int) -> torch.Tensor:
    """Flat (channel, row, column) indices in raster order: row, column, then channel."""
    flat = [k * h * w + i * w + j for i in range(h) for j in range(w) for k in range(c)]
    return torch.tensor(flat)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_emerging_jacobian_is_upper_times_lower_triangular_with_a_k_by_k_field(kernel_size):
    c, h, w = 3, 4, 5
    layer = _perturb(EmergingConv(c, kernel_size, conv1x1=False)).double()
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    order = _raster(c, h, w)
    lower = _jacobian(lambda v: layer._conv(v, "lower"), x)[order][:, order]
    upper = _jacobian(lambda v: layer._conv(v, "upper"), x)[order][:, order]
    # Each factor is autoregressive: triangular in raster order, the second the other way, and
    # really mixing across pixels, not only within one.
    assert torch.all(torch.triu(lower, 1) == 0) and torch.tril(lower, -c).abs().sum() > 0
    assert torch.all(torch.tril(upper, -1) == 0) and torch.triu(upper, c).abs().sum() > 0
    full = _jacobian(lambda v: layer(v)[0], x)[order][:, order]
    torch.testing.assert_close(full, upper @ lower)
    # The diagonal is the centre taps' exp(log_diag), at every pixel: log-det H W sum(...).
    diag = torch.diagonal(lower) * torch.diagonal(upper)
    per_pixel = (layer.log_diag_lower + layer.log_diag_upper).exp().detach()
    torch.testing.assert_close(diag, per_pixel.repeat(h * w))
    # The composition sees exactly a k x k neighbourhood: dense up to k // 2 pixels away
    # (emerging), nothing beyond.
    r = kernel_size // 2
    pos = torch.tensor([(i, j) for i in range(h) for j in range(w) for _ in range(c)])
    dist = (pos[:, None, :] - pos[None, :, :]).abs().amax(-1)
    assert torch.all(full[dist > r] == 0)
    assert torch.all(full[dist <= r].reshape(-1) != 0)


def test_emerging_inverse_in_float32_and_of_a_single_pixel():
    layer = _perturb(nfcv.build_layer("emerging_conv", (4, 8, 8)), 0.1).eval()
    x = torch.randn(3, 4, 8, 8)
    z, logdet = layer(x)
    x_rec, inv_logdet = layer.inverse(z)
    torch.testing.assert_close(x_rec, x, atol=1e-4, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet)
    one = _perturb(nfcv.build_layer("emerging_conv", (2, 1, 1), kernel_size=1)).double()
    x = torch.randn(2, 2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(one.inverse(one(x)[0])[0], x)


def _digits_batch() -> torch.Tensor:
    return torch.randint(0, 17, (8, 1, 8, 8))


def _round_trip(model: nfcv.ImageFlow) -> None:
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        eps, _ = model.transform(x)
        torch.testing.assert_close(model.inverse(eps), x, atol=1e-4, rtol=0)


def test_glow_with_emerging_builds_trains_a_step_and_inverts():
    cfg = nfcv.compose(["model.permutation=emerging", "model.steps=2", "model.hidden=8"])
    model = nfcv.build_model(cfg)
    assert sum(isinstance(m, EmergingConv) for m in model.modules()) == 2 * 2
    model.train()
    bpd = model.bits_per_dim(_digits_batch())
    assert torch.isfinite(bpd).all()
    bpd.mean().backward()
    with torch.no_grad():
        for p in model.parameters():  # off the identity start, so the round trip means something
            p.add_(0.05 * torch.randn_like(p))
    _round_trip(model.eval())


def test_glow_emerging_kernel_too_large_for_the_top_level_fails_at_build():
    with pytest.raises(ValueError, match=r"kernel_size=5 does not fit the 2x2 input"):
        nfcv.build_model(
            nfcv.compose(
                ["model.permutation=emerging", "model.choices.permutation.emerging.kernel_size=5"]
            )
        )


def test_nice_with_full_linear_builds_and_inverts():
    cfg = nfcv.compose(["model=nice", "model.linear=full_linear", "model.hidden=16"])
    model = nfcv.build_model(cfg)
    linears = [m for m in model.modules() if isinstance(m, FullLinear)]
    assert len(linears) == 4 and linears[0].shape == (64,)
    model.train()
    bpd = model.bits_per_dim(_digits_batch())
    assert torch.isfinite(bpd).all()
    _perturb(model, 0.05)
    _round_trip(model.eval())
    # The default NICE has none.
    plain = nfcv.build_model(nfcv.compose(["model=nice"]))
    assert not any(isinstance(m, FullLinear) for m in plain.modules())


@pytest.mark.parametrize(
    "choice",
    [["model.permutation=emerging"], ["model=nice", "model.linear=full_linear"]],
    ids=["glow_emerging", "nice_full_linear"],
)
def test_train_save_and_load_on_digits(tmp_path, tiny, choice):
    from nfcv.training.run import train

    overrides = tiny()
    if "model=nice" in choice:  # NICE has no levels or steps
        overrides = [o for o in overrides if not o.startswith(("model.steps", "model.levels"))]
    summary = train(nfcv.compose([*overrides, *choice]), run_dir=tmp_path / "run")
    assert summary["steps"] == 4
    assert 0 < summary["test_bpd"] < 6
    loaded = nfcv.load(summary["best_ckpt"])
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.inverse(loaded.transform(x)[0]), x, atol=1e-4, rtol=0)
