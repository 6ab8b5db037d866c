"""Residual flows (nfcv/flows/residual.py): the log-det estimators against the brute-force
Jacobian, the fixed-point inverse against its tolerance, the spectral normalisation against the
convolution's true operator norm, and the checks on `lipschitz`."""

from __future__ import annotations

import math
import random

import pytest
import torch

import nfcv
from nfcv.errors import ConfigError, NumericalError
from nfcv.flows import ResidualBlock, SpectralNormConv2d


def _converge(block: ResidualBlock, iterations: int = 2000) -> ResidualBlock:
    """Run every convolution's power iteration to convergence (stored)."""
    with torch.no_grad():
        for conv in block.convs:
            conv.sigma(iterations, store=True)
    return block


def _strong_block(shape=(2, 2, 2), seed=0, **kwargs) -> ResidualBlock:
    """A block whose convolutions all sit at their Lipschitz cap (weights scaled far above it),
    so g is far from the identity and the log-det far from 0."""
    torch.manual_seed(seed)
    kwargs = {"hidden": 6, "lipschitz": 0.9, **kwargs}
    block = nfcv.build_layer("resflow", shape, **kwargs).double()
    with torch.no_grad():
        for conv in block.convs:
            conv.weight.mul_(20.0)
            conv.bias.normal_(3.0, 0.5)  # the linear side of LipSwish: slopes near 1/1.1
        for act in block.acts:
            act.raw_beta.fill_(1.5)
    return _converge(block)


def _brute_force_logdet(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    out = []
    shape = x.shape[1:]
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda v: block(v.view(1, *shape))[0].reshape(-1), xi.reshape(-1)
        )
        sign, logdet = torch.linalg.slogdet(jac)
        assert sign > 0
        out.append(logdet)
    return torch.stack(out)


@pytest.mark.parametrize(
    "kwargs", [{}, {"preact": False}, {"dense": True}, {"kernels": [3, 3]}, {"kernels": [1]}]
)
def test_exact_logdet_matches_the_brute_force_jacobian(kwargs):
    block = _strong_block(**kwargs, logdet="exact").eval()
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    _, logdet = block(x)
    expected = _brute_force_logdet(block, x)
    assert expected.abs().min() > 0.05  # far from the identity: the check means something
    torch.testing.assert_close(logdet, expected, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # Poisson roulette, Neumann-series gradient
        {"n_dist": "geometric", "geometric_p": 0.5, "exact_terms": 1},
        {"neumann_grad": False, "exact_terms": 0},
    ],
)
def test_training_estimator_is_unbiased_within_its_standard_error(kwargs):
    """The Russian-roulette + Hutchinson estimate, and its gradient, average to the exact log-det
    and the exact log-det's gradient over many independent draws (fixed seeds). Each call sees
    one image 16 times: one roulette draw, 16 probes; the calls are the independent draws."""
    block = _strong_block(**kwargs)
    exact_block = _strong_block(**kwargs, logdet="exact")
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64)
    direction = [torch.randn_like(p) for p in block.parameters()]

    def logdet_and_slope(layer, batch):
        _, logdet = layer(batch)
        if not logdet.requires_grad:  # no term drawn (no exact terms): the estimate is 0
            return logdet.detach().mean(), torch.zeros((), dtype=logdet.dtype)
        grads = torch.autograd.grad(logdet.mean(), list(layer.parameters()), allow_unused=True)
        slope = sum((g * d).sum() for g, d in zip(grads, direction, strict=True) if g is not None)
        return logdet.detach().mean(), slope.detach()

    exact, exact_slope = logdet_and_slope(exact_block.train(), x)
    assert abs(exact) > 0.2
    random.seed(1)
    torch.manual_seed(1)
    batch = x.expand(16, -1, -1, -1)
    draws = torch.stack([torch.stack(logdet_and_slope(block.train(), batch)) for _ in range(150)])
    for i, target in enumerate((exact, exact_slope)):
        mean, stderr = draws[:, i].mean(), draws[:, i].std() / math.sqrt(len(draws))
        assert draws[:, i].std() > 1e-3  # really random, not a constant that happens to be close
        assert abs(mean - target) < 4 * stderr, (i, float(mean), float(target), float(stderr))


def test_eval_estimate_is_deterministic_and_unbiased_over_seeds():
    block = _strong_block(eval_probes=2, eval_exact_terms=3).eval()
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    exact = _brute_force_logdet(block, x)
    first, second = block(x)[1], block(x)[1]
    assert torch.equal(first, second)  # seeded: the same batch gives the same figure
    with torch.no_grad():
        assert torch.equal(block(x)[1], first.detach())
    estimates = []
    for seed in range(150):
        block.eval_seed = seed
        with torch.no_grad():
            estimates.append(block(x)[1])
    estimates = torch.stack(estimates)
    mean, stderr = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert torch.all((mean - exact).abs() < 4 * stderr), (mean, exact, stderr)
    assert torch.all(estimates.std(0) > 1e-3)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_inverse_reaches_the_fixed_point_tolerance(dtype, tol):
    block = _strong_block(shape=(2, 4, 4), tol=tol).to(dtype).eval()
    x = 2 * torch.randn(5, 2, 4, 4, dtype=dtype)
    z, logdet = block(x)
    assert (z - x).abs().max() > 0.5  # g moves the input: the inverse has work to do
    x_rec, inv_logdet = block.inverse(z)
    err = (x_rec - x).reshape(5, -1).norm(dim=1)
    # The stopping rule bounds the 2-norm error by tol (float32: by its rounding level).
    bound = tol if dtype == torch.float64 else max(tol, 1e-5)
    assert err.max() <= bound, err
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-4, rtol=1e-4)


def test_inverse_that_does_not_converge_is_an_error():
    block = _strong_block(shape=(2, 4, 4), tol=1e-12, max_iter=2).eval()
    z, _ = block(torch.randn(2, 2, 4, 4, dtype=torch.float64))
    with pytest.raises(NumericalError, match="max_iter=2"):
        block.inverse(z)


def test_power_iteration_finds_the_convolutions_operator_norm():
    """3x3 convolution on 4x4 inputs: the power iteration on conv2d / conv_transpose2d finds the
    top singular value of the operator (the brute-force Jacobian of the convolution), which the
    reshaped weight matrix's norm does not give."""
    torch.manual_seed(0)
    conv = SpectralNormConv2d(2, 3, 3, (4, 4), lipschitz=0.9).double()
    with torch.no_grad():
        sigma = conv.sigma(500, store=True)
    jac = torch.autograd.functional.jacobian(
        lambda v: torch.nn.functional.conv2d(v.view(1, 2, 4, 4), conv.weight, padding=1),
        torch.zeros(32, dtype=torch.float64),
    ).reshape(48, 32)
    true_norm = torch.linalg.matrix_norm(jac, ord=2)
    torch.testing.assert_close(sigma, true_norm, rtol=1e-8, atol=0)
    reshaped = torch.linalg.matrix_norm(conv.weight.reshape(3, -1), ord=2)
    assert abs(reshaped - true_norm) > 1e-2 * true_norm
    torch.testing.assert_close(conv.operator_matrix(), jac)


def test_lipschitz_constant_of_g_is_below_the_coefficient():
    block = _strong_block(shape=(2, 3, 3), hidden=4).eval()
    for conv in block.convs:
        weight = conv.normalised_weight(0, store=False).detach()
        norm = torch.linalg.matrix_norm(conv.operator_matrix(weight), ord=2)
        assert norm <= block.lipschitz * (1 + 1e-6)  # to the power iteration's accuracy
        assert norm >= 0.99 * block.lipschitz  # capped, not merely small
    for _ in range(5):
        x = 3 * torch.randn(18, dtype=torch.float64)
        jac = torch.autograd.functional.jacobian(
            lambda v: block.g(v.view(1, 2, 3, 3)).reshape(-1), x
        )
        assert torch.linalg.matrix_norm(jac, ord=2) < block.lipschitz_bound * (1 + 1e-6)


@pytest.mark.parametrize("value", [1.0, 1.5, 0.0, -0.5])
def test_lipschitz_at_or_above_one_is_refused(value):
    with pytest.raises(ValueError, match="lipschitz must be in \\(0, 1\\)"):
        nfcv.build_layer("resflow", (2, 4, 4), lipschitz=value)
    with pytest.raises(ConfigError, match="lipschitz must be in"):
        nfcv.build_model(nfcv.compose(["model=resflow", f"model.lipschitz={value}"]))


def test_bad_block_settings_are_refused():
    for kwargs, needle in (
        ({"kernels": [2]}, "odd"),
        ({"logdet": "nope"}, "logdet"),
        ({"n_dist": "uniform"}, "n_dist"),
        ({"eval_probes": 0}, "eval_probes"),
        ({"spatial": [4]}, "spatial"),
    ):
        with pytest.raises(ValueError, match=needle):
            nfcv.build_layer("resflow", (2, 4, 4), **kwargs)
    with pytest.raises(ValueError, match=r"\(2, 4, 4\).*\(2, 4, 6\)"):
        nfcv.build_layer("resflow", (2, 4, 4)).output_shape((2, 4, 6))


def test_training_step_reads_nothing_back_from_the_device(monkeypatch):
    """No `.item()`, `bool(tensor)`, `float(tensor)`, `int(tensor)` or `tolist()` in a training
    forward and backward: the roulette is drawn with Python's `random`."""
    block = nfcv.build_layer("resflow", (2, 4, 4), hidden=4).train()
    x = torch.randn(3, 2, 4, 4)
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    z, logdet = block(x)
    ((z**2).sum() - logdet.sum()).backward()
    monkeypatch.undo()
    assert reads == []


def test_preset_builds_trains_and_round_trips():
    model = nfcv.build_model(
        nfcv.compose(
            ["model=resflow", "model.hidden=8", "model.blocks=[1,1]", "model.fc_blocks=1"]
        )
    )
    x = torch.randint(0, 17, (8, 1, 8, 8))
    model.train()
    bpd = model.bits_per_dim(x)
    bpd.mean().backward()
    assert torch.isfinite(bpd).all()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        u = torch.rand(4, 1, 8, 8)
        eps, _ = model.transform(u)
        torch.testing.assert_close(model.inverse(eps), u, atol=1e-4, rtol=0)
        assert torch.isfinite(model.sample(4)).all()


def _resflow_cifar10_count() -> int:
    """Residual Flows' CIFAR-10 model by hand from the sizes in rtqichen/residual-flows
    (train_img.py defaults): per scale 16 blocks of conv3x3 (C -> 512), conv1x1 (512 -> 512),
    conv3x3 (512 -> C), each with weights and biases, 3 LipSwish betas (2 in the very first
    block), an ActNorm (2C) after every block, one before the first; 4 dense blocks on the
    48 x 8 x 8 = 3072 values (3072 -> 128 -> 128 -> 3072, 3 betas, a per-position ActNorm)."""
    hidden, total = 512, 2 * 3
    for c in (3, 12, 48):
        convs = (c * hidden * 9 + hidden) + (hidden * hidden + hidden) + (hidden * c * 9 + c)
        total += 16 * (convs + 3 + 2 * c)
    total -= 1  # the first block has no leading activation
    d, fc = 48 * 8 * 8, 128
    total += 4 * ((d * fc + fc) + (fc * fc + fc) + (fc * d + d) + 3 + 2 * d)
    return total


def test_resflow_cifar10_has_the_papers_size():
    # One power iteration at build time: the count does not depend on it, the build time does.
    cfg = nfcv.compose(["experiment=resflow_cifar10", "model.block.init_power_iterations=1"])
    model = nfcv.build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    # The authors' code counts 2 more per block (its roulette's distribution parameters, which
    # it never trains): 52 blocks.
    assert count == _resflow_cifar10_count() == 25_174_129
    assert cfg.optim.optimizer.betas == [0.9, 0.99] and cfg.trainer.gradient_clip_val == 1.0
    assert cfg.model.block.eval_exact_terms == 20


@pytest.mark.slow
def test_preset_learns_digits():
    """60 Adam steps on the digits lower the validation bits per dim by more than 0.25 (a
    contractive g moves more slowly than a coupling: twice the steps of the other presets'
    test in tests/test_presets.py)."""
    from nfcv.data import DigitsDataModule

    torch.manual_seed(0)
    random.seed(0)  # the roulette's draws
    dm = DigitsDataModule(image_shape=[1, 8, 8], num_bins=17, batch_size=64, val_size=150)
    train, val = dm.split("train").images, dm.split("val").images[:128]
    overrides = ["model=resflow", "model.hidden=16", "model.blocks=[1,1]", "model.fc_blocks=1"]
    model = nfcv.build_model(nfcv.compose(["data=digits", *overrides]))

    def val_bpd() -> float:
        model.eval()
        with torch.no_grad():
            return model.bits_per_dim(val).mean().item()

    model.train()
    model.bits_per_dim(train[:64])  # ActNorm's data-dependent init
    before = val_bpd()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for step in range(60):
        loss = model.bits_per_dim(train[(step * 32) % 1024 :][:32]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_bpd()
    assert after < before - 0.25, (before, after)
