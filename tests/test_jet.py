"""Jet (arXiv:2412.15129): the coupling's splits against the authors' patterns, its bounded scale
and exact log-det, the preset (inverse, bf16, gradient checkpointing, bad input), and the
ImageNet-64 experiment's parameter count against the source's shapes."""

from __future__ import annotations

import math

import pytest
import torch

import nfcv
from nfcv.errors import ConfigError
from nfcv.flows import Jet, JetCoupling
from nfcv.flows.jet import spatial_halves

# A tiny preset on the 8x8 digits: 16 tokens of 4 values, every split kind in 3 couplings.
TINY = ["data=digits", "model=jet", "model.width=8", "model.heads=2", "model.couplings=3"]


def _tiny_model(*extra: str) -> nfcv.ImageFlow:
    model = nfcv.build_model(nfcv.compose([*TINY, *extra]))
    with torch.no_grad():  # off the identity start, so the checks mean something
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# ------------------------------------------------------------------------------------ splits


def _grid_halves(gh: int, gw: int, first) -> tuple[list[int], list[int]]:
    cells = [(r, c) for r in range(gh) for c in range(gw)]
    a = [r * gw + c for r, c in cells if first(r, c)]
    b = [r * gw + c for r, c in cells if not first(r, c)]
    return a, b


@pytest.mark.parametrize(
    "split, first",
    [
        ("checkerboard", lambda r, c: (r + c) % 2 == 0),
        ("vstripes", lambda r, c: c % 2 == 0),
        ("hstripes", lambda r, c: r % 2 == 0),
    ],
)
def test_spatial_patterns_are_the_papers_on_a_grid_with_even_rows(split, first):
    """On a 4x6 grid (even row length): a checkerboard of the tokens, even / odd columns (vertical
    stripes), even / odd rows (horizontal stripes); "-inv" swaps the halves."""
    a, b = _grid_halves(4, 6, first)
    idx1, idx2 = spatial_halves(split, (4, 6))
    assert idx1.tolist() == a and idx2.tolist() == b
    inv1, inv2 = spatial_halves(f"{split}-inv", (4, 6))
    assert inv1.tolist() == b and inv2.tolist() == a


def test_spatial_split_that_cannot_halve_the_grid_is_refused():
    # 7x7 tokens (Fashion-MNIST at patch 4): 49 tokens have no two equal halves.
    with pytest.raises(ValueError, match="equal halves.*kinds=\\[channels\\]"):
        spatial_halves("checkerboard", (7, 7))
    with pytest.raises(ValueError, match="equal halves"):
        spatial_halves("hstripes", (3, 4))  # 2 even rows, 1 odd: 8 and 4 tokens


def _coupling(split: str, grid=(2, 4), dim: int = 6, **kw) -> JetCoupling:
    n = grid[0] * grid[1]
    return nfcv.build_layer(
        "jet_coupling", (n, dim), split=split, grid=list(grid), net={"width": 8, "heads": 2}, **kw
    )


@pytest.mark.parametrize("split", ["channels", "checkerboard", "hstripes-inv"])
def test_pass_through_half_is_bit_exact_and_the_rest_moves(split):
    layer = _coupling(split)
    with torch.no_grad():
        layer.net.out.bias.normal_()
    x = torch.randn(3, 8, 6)
    y, _ = layer(x)
    if split == "channels":
        kept = layer.order[:3]
        assert torch.equal(y[..., kept], x[..., kept])
        moved = layer.order[3:]
        assert not torch.isclose(y[..., moved], x[..., moved]).any()
    else:
        idx1, idx2 = spatial_halves(split, (2, 4))
        assert torch.equal(y[:, idx1], x[:, idx1])
        assert not torch.isclose(y[:, idx2], x[:, idx2]).any()


def test_token_counts_that_are_no_square_need_a_grid_only_for_spatial_splits():
    assert nfcv.build_layer("jet_coupling", (6, 4)).output_shape((6, 4)) == (6, 4)
    with pytest.raises(ValueError, match="not a square grid"):
        nfcv.build_layer("jet_coupling", (6, 4), split="vstripes")
    with pytest.raises(ValueError, match="tokens of an even number"):
        nfcv.build_layer("jet_coupling", (4, 5))


def test_channel_permutation_is_fixed_by_the_seed_and_differs_between_seeds():
    a, b, c = (_coupling("channels", dim=16, seed=s).order for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert sorted(a.tolist()) == list(range(16))


def test_spatial_conditioner_sees_every_kept_token_cut_in_two():
    """The authors' layout: for a spatial split the ViT gets N tokens of D/2 values, kept token j
    giving rows 2j (its first D/2 values) and 2j + 1 (its last D/2)."""
    layer = _coupling("vstripes")
    seen = []
    layer.net.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(2, 8, 6)
    layer(x)
    kept = x[:, spatial_halves("vstripes", (2, 4))[0]]  # (2, 4 tokens, 6)
    expected = torch.stack([kept[..., :3], kept[..., 3:]], dim=2).reshape(2, 8, 3)
    assert torch.equal(seen[0], expected)


@pytest.mark.parametrize("split", ["channels", "checkerboard"])
def test_scale_is_bounded_and_the_logdet_is_the_sum_by_hand(split):
    """s = 2 sigmoid(h) in (0, 2): for a constant network output h the transformed half is
    ``(x2 + b) * 2 sigmoid(h)`` and the log-det ``N D / 2 * log(2 sigmoid(h))`` for every sample,
    finite even for |h| = 1e4."""
    layer = _coupling(split).double()
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    for h, shift in ((0.0, 0.0), (1.3, -0.4), (-1e4, 0.2), (1e4, 0.0)):
        with torch.no_grad():
            layer.net.out.bias[:3] = shift
            layer.net.out.bias[3:] = h
        y, logdet = layer(x)
        h64 = torch.tensor(h, dtype=torch.float64)
        s = 2 * torch.sigmoid(h64)
        expected = 24 * math.log(2) + 24 * torch.nn.functional.logsigmoid(h64)
        torch.testing.assert_close(logdet, expected.expand(2), rtol=1e-12, atol=1e-9)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        if split == "channels":
            moved = layer.order[3:]
            torch.testing.assert_close(y[..., moved], (x[..., moved] + shift) * s)
        assert (h != 0.0) or torch.equal(y, x)  # h = 0, b = 0: the identity


# ------------------------------------------------------------------------------------ preset


def test_preset_cycles_the_kinds_and_the_spatial_patterns():
    cfg = nfcv.compose(
        [*TINY, "model.couplings=7", "model.kinds=[channels,spatial]",
         "model.spatial_splits=[checkerboard,vstripes,hstripes-inv]"]
    )  # fmt: skip
    flow = nfcv.build_model(cfg).flow
    assert isinstance(flow, Jet)
    splits = [m.split for m in flow.modules() if isinstance(m, JetCoupling)]
    assert splits == [
        "channels", "checkerboard", "channels", "vstripes", "channels", "hstripes-inv", "channels"
    ]  # fmt: skip
    # Channel coupling i permutes with seed permutation_seed + i (0 here).
    orders = [m.order for m in flow.modules() if isinstance(m, JetCoupling)][::2]
    for i, order in zip((0, 2, 4, 6), orders, strict=True):
        assert torch.equal(order, torch.randperm(4, generator=torch.Generator().manual_seed(i)))


def test_preset_is_exactly_invertible_and_its_logdet_is_the_jacobians():
    model = _tiny_model().double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    eps, logdet = model.transform(x)
    torch.testing.assert_close(model.inverse(eps), x, atol=1e-10, rtol=0)
    jac = torch.autograd.functional.jacobian(
        lambda v: model.transform(v.view(1, 1, 8, 8))[0].reshape(-1),
        x[0].reshape(-1),
        vectorize=True,
    )
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], atol=1e-8, rtol=0)


def test_preset_starts_as_the_shifted_identity_under_a_standard_normal():
    """Every coupling starts as the identity: the bits per dim of the untrained model are those of
    N(0, I) on ``x + u) / B - 0.5``, computed by hand."""
    model = nfcv.build_model(nfcv.compose(TINY))
    x = torch.randint(0, 17, (4, 1, 8, 8))
    torch.manual_seed(0)
    bpd = model.bits_per_dim(x)
    torch.manual_seed(0)
    y = (x + torch.rand(x.shape)) / 17 - 0.5
    log_p = -0.5 * (y.pow(2) + math.log(2 * math.pi)).sum((1, 2, 3)) - 64 * math.log(17)
    torch.testing.assert_close(bpd, -log_p / (64 * math.log(2)))


def test_bf16_autocast_keeps_the_main_path_in_float32():
    model = _tiny_model()
    x = torch.randint(0, 17, (32, 1, 8, 8))
    with torch.no_grad():
        torch.manual_seed(0)
        full = model.bits_per_dim(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            mixed = model.bits_per_dim(x)
            eps, logdet = model.transform(torch.rand(4, 1, 8, 8))
    assert mixed.dtype == eps.dtype == logdet.dtype == torch.float32
    assert abs(mixed.mean().item() - full.mean().item()) < 0.01


def test_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny_model().train()
    x = torch.randint(0, 17, (8, 1, 8, 8))

    def grads(flag: bool) -> dict[str, torch.Tensor]:
        assert model.checkpoint_networks(flag) == 3
        model.zero_grad()
        torch.manual_seed(0)
        model.bits_per_dim(x).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-7)
    cfg = nfcv.compose([*TINY, "model.checkpoint_grads=true"])
    model = nfcv.build_model(cfg)
    layers = [m for m in model.modules() if isinstance(m, JetCoupling)]
    assert layers and all(m.checkpoint_grads for m in layers)
    assert model.compile_networks() == 3  # compile=true reaches the ViTs too (compiled lazily)
    assert all(m.net._compiled_call_impl is not None for m in layers)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["model.patch_size=3"], r"model.patch_size=3: must be .* divides the image's height"),
        (["model.width=10", "model.heads=4"], r"model.heads=4: must be .* divides model.width"),
        (
            ["model.kinds=[channels,spatial]", "model.patch_size=4", "data=fashion_mnist"],
            r'model.spatial_splits=\["checkerboard","checkerboard-inv"\]: must be .* equal halves',
        ),
        (["model.spatial_splits=[zigzag]"], r'model.spatial_splits=\["zigzag"\]: must be'),
    ],
)
def test_bad_sizes_fail_when_the_config_is_composed(overrides, match):
    with pytest.raises(ConfigError, match=match):
        nfcv.compose([*TINY, *overrides])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kinds": ["channels", "spatial"], "patch_size": 4}, "does not cut a 7x7 grid"),
        ({"kinds": ["diagonal"]}, "kinds must be"),
        ({"spatial_splits": ["zigzag"]}, "spatial_splits must list"),
    ],
)
def test_bad_layouts_fail_when_the_model_is_built(overrides, match):
    """What the value rules catch when composing, the model catches again when it is built
    (a config edited after composing, or a checkpoint's)."""
    cfg = nfcv.compose([*TINY, "data=fashion_mnist"])
    for key, value in overrides.items():
        cfg.model[key] = value
    with pytest.raises(ConfigError, match=f"cannot build model 'jet': .*{match}"):
        nfcv.build_model(cfg)


def test_bad_patch_size_stops_training_before_the_run_folder(tmp_path):
    from nfcv.training.run import train

    cfg = nfcv.compose(TINY)
    cfg.model.patch_size = 3  # as a caller of the Python API may set it after composing
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="model.patch_size=3"):
        train(cfg, run_dir=run_dir)
    assert not run_dir.exists()


# ------------------------------------------------------------------------ experiments


def _reference_jet_count(couplings, block_depth, width, patch, channels, size, mlp_ratio=4):
    """Trainable parameters of big_vision's Jet (models/proj/jet/jet.py) from its layer shapes:
    per coupling a `DNN`: init_proj Dense(D/2 -> width), posemb (N, width), `block_depth` ViT
    encoder blocks (two LayerNorms, multi-head attention q, k, v, out of width x width with
    biases, MLP width -> mlp -> width with biases), the encoder's final LayerNorm and final_proj
    Dense(width -> D). The frozen permutation matrices are left out (not trained)."""
    tokens, dim = (size // patch) ** 2, patch * patch * channels
    mlp = mlp_ratio * width
    attention = 4 * (width * width + width)
    block = 2 * (2 * width) + attention + (width * mlp + mlp) + (mlp * width + width)
    dnn = (dim // 2 * width + width) + tokens * width + block_depth * block + 2 * width
    dnn += width * dim + dim
    return couplings * dnn


def test_imagenet64_experiment_has_the_sources_parameter_count():
    cfg = nfcv.compose(["experiment=jet_imagenet64"])
    assert cfg.optim.optimizer.betas == [0.9, 0.95] and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.optim.optimizer.lr * cfg.optim.optimizer.weight_decay == pytest.approx(1e-5, 1e-5)
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches == 1024
    with torch.device("meta"):
        model = nfcv.build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    expected = _reference_jet_count(32, 2, 512, 4, 3, 64)
    assert count == expected == 207_177_216
    splits = [m.split for m in model.modules() if isinstance(m, JetCoupling)]
    assert splits[:5] == ["channels"] * 4 + ["checkerboard"] and splits.count("channels") == 26
    assert [s for s in splits if s != "channels"] == [
        "checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes", "hstripes-inv"
    ]  # fmt: skip


def test_fashion_experiment_composes_at_glows_budget():
    jet = nfcv.compose(["experiment=jet_fashion_mnist"])
    glow = nfcv.compose(["experiment=glow_fashion_mnist"])
    assert jet.trainer.max_steps == glow.trainer.max_steps == 600
    assert jet.data.batch_size == glow.data.batch_size
    with torch.device("meta"):
        model = nfcv.build_model(jet)
    assert model.flow.output_shape((1, 28, 28)) == (784,)


# ------------------------------------------------------------------------ training, end to end


@pytest.mark.slow
def test_trains_with_ema_bf16_and_checkpointing_then_evaluates_and_samples(tmp_path):
    """The real Trainer for 3 steps with EMA, bf16 autocast and gradient checkpointing; the
    checkpoint reloads with its EMA weights, its breakdown adds up to bits_per_dim, and every
    sample mode decodes (grid, interpolation and reconstruction exact to float32)."""
    from nfcv.checkpoint import load_checkpoint
    from nfcv.evaluate import bits_per_dim_parts
    from nfcv.grid import draw_samples, interpolation_grid, reconstruction_grid, sample_grid
    from nfcv.training.run import train

    cfg = nfcv.compose(
        [
            *TINY,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false",
            "trainer.precision=bf16-mixed",
            "model.checkpoint_grads=true",
            "ema.decay=0.9",
            "sample.every_n_steps=3",
            "sample.per_row=2",
            "data.batch_size=16",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 3 and 0 < summary["test_bpd"] < 10
    loaded = load_checkpoint(summary["best_ckpt"])
    trained = load_checkpoint(summary["best_ckpt"], ema=False).model
    assert loaded.uses_ema
    model = loaded.model
    # The EMA weights differ from the trained ones (3 steps at decay <= 0.9 moved them apart).
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model.parameters(), trained.parameters(), strict=True)
    )
    x = torch.randint(0, 17, (6, 1, 8, 8))
    torch.manual_seed(0)
    total, parts = bits_per_dim_parts(model, x)
    torch.manual_seed(0)
    torch.testing.assert_close(total, model.bits_per_dim(x).double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(parts.values()), total, rtol=0, atol=1e-10)
    assert set(parts) >= {"latent"}
    assert sample_grid(model, [0.5, 1.0], 2).shape[0] == 3
    assert reconstruction_grid(model, x, nrow=3)[1] < 1e-5
    assert interpolation_grid(model, x[:3], steps=4)[1] < 1e-5
    images, temps = draw_samples(model, [0.7], 3, batch_size=2)
    assert images.shape == (3, 1, 8, 8) and torch.isfinite(images).all()
