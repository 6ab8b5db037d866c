"""The four architectures of the tutorial's table (NICE, RealNVP, Glow, Flow++) as whole models,
with uniform and variational dequantization: exact inverses, log-dets against the brute-force
Jacobian, gradients everywhere, the importance-weighted bound, the papers' parameter counts, and
training on digits."""

from __future__ import annotations

import math

import pytest
import torch

import nfcv
from nfcv.dequant import VariationalDequantization, standard_normal_log_prob
from nfcv.flows import ActNorm

# Tiny sizes of each preset on the 8x8 digits.
PRESETS = {
    "nice": ["model=nice", "model.hidden=8", "model.layers=1"],
    "nice_gaussian": ["model=nice", "model.hidden=8", "model.layers=1", "model.prior=gaussian"],
    "realnvp": ["model=realnvp", "model.hidden=4", "model.blocks=1"],
    "glow": ["model=glow", "model.hidden=4", "model.steps=1"],
    "flowpp": [
        "model=flowpp",
        "model.scales=[[0,2],[2,1]]",
        "model.hidden=8",
        "model.blocks=1",
        "model.components=2",
        "model.heads=2",
        # Bisection to below the float64 checks' tolerance.
        "model.flow.coupling.tol=1e-12",
    ],
    "tarflow": [
        "model=tarflow",
        "model.width=8",
        "model.head_dim=4",
        "model.blocks=2",
        "model.layers=1",
    ],
}
VARIATIONAL = [
    "dequant=variational",
    "dequant.num_steps=2",
    "dequant.context_channels=4",
    "dequant.context_blocks=1",
    "dequant.coupling.num_components=2",
    "dequant.coupling.net.hidden_channels=8",
    "dequant.coupling.net.heads=2",
]


def _model(name: str, *extra: str) -> nfcv.ImageFlow:
    model = nfcv.build_model(nfcv.compose(["data=digits", *PRESETS[name], *extra]))
    model.train()
    model.bits_per_dim(torch.randint(0, 17, (32, 1, 8, 8)))  # data-dependent inits, as in training
    with torch.no_grad():
        for p in model.parameters():  # off the identity start, so the checks mean something
            p.add_(0.03 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_whole_model_inverse_and_logdet_against_brute_force_jacobian(name):
    model = _model(name).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 0.98 + 0.01
    eps, logdet = model.transform(x)
    assert eps.shape == (2, 64) and logdet.shape == (2,)
    torch.testing.assert_close(model.inverse(eps), x, atol=1e-9, rtol=0)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda v: model.transform(v.view(1, 1, 8, 8))[0].reshape(-1), x[i].reshape(-1)
        )
        sign, expected = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], expected, atol=1e-7, rtol=1e-9)
    assert model.log_prob(x).shape == (2,)


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("dequant", ["uniform", "variational"])
def test_every_parameter_gets_a_gradient(name, dequant):
    model = _model(name, *(VARIATIONAL if dequant == "variational" else []))
    model.train()
    model.bits_per_dim(torch.randint(0, 17, (8, 1, 8, 8))).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing
    assert sum(p.numel() for p in model.dequantizer.parameters()) > 0 or dequant == "uniform"


def test_variational_log_q_matches_brute_force_jacobian_of_the_noise_map():
    model = _model("glow", *VARIATIONAL).double()
    deq = model.dequantizer
    assert isinstance(deq, VariationalDequantization)
    x = torch.randint(0, 17, (1, 1, 8, 8)).double()
    context = deq.context(x, 17)
    eps = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    u, logdet = deq.noise_to_u(eps, context)
    assert u.min() > 0 and u.max() < 1
    jac = torch.autograd.functional.jacobian(
        lambda v: deq.noise_to_u(v.view(1, 1, 8, 8), context)[0].reshape(-1), eps.reshape(-1)
    )
    sign, expected = torch.linalg.slogdet(jac)
    assert sign != 0
    torch.testing.assert_close(logdet[0], expected, atol=1e-8, rtol=1e-10)
    # forward() draws eps itself: same seed, same eps, and log q = log N(eps) - log-det.
    torch.manual_seed(3)
    y, log_q = deq(x, 17)
    torch.manual_seed(3)
    eps = torch.randn_like(x)
    u, logdet = deq.noise_to_u(eps, context)
    torch.testing.assert_close(y, (x + u) / 17)
    torch.testing.assert_close(log_q, standard_normal_log_prob(eps.view(1, -1)) - logdet)


def test_importance_weighted_bound_is_jensen_tight_and_improves_with_k():
    model = _model("nice", *VARIATIONAL)
    x = torch.randint(0, 17, (16, 1, 8, 8))
    with torch.no_grad():
        # Same noise: bits_per_dim(k=16) draws its 16 samples in one pass of 16 copies.
        torch.manual_seed(5)
        bound16 = model.bits_per_dim(x, k=16)
        torch.manual_seed(5)
        w = model.log_weights(x.repeat(16, 1, 1, 1).float()).view(16, 16)
        per_sample_bpd = -w / (64 * math.log(2))
        torch.testing.assert_close(
            bound16, -(torch.logsumexp(w, 0) - math.log(16)) / (64 * math.log(2))
        )
        # logmeanexp >= mean, for every image: the k=16 bound is no looser than the average
        # single-sample bound on the same noise.
        assert (bound16 <= per_sample_bpd.mean(0) + 1e-6).all()
        # And over fresh noise, on average over the images, k=16 is strictly tighter than k=1
        # for an untrained q (its weights vary).
        torch.manual_seed(6)
        k1 = torch.stack([model.bits_per_dim(x) for _ in range(8)]).mean()
        torch.manual_seed(7)
        k16 = model.bits_per_dim(x, k=16).mean()
    assert k16 < k1 - 1e-3, (k16, k1)


def test_uniform_dequantization_k16_is_no_looser_than_k1_on_average():
    """Uniform dequantization: the k=16 bound is, in expectation, no larger than the k=1 one
    (Jensen; equal only for a density flat within every bin). Fresh noise for each, so the check
    is statistical: k=16 may not exceed the mean of 16 single-sample bounds by more than three
    standard errors over the images."""
    model = nfcv.build_model(
        nfcv.compose(["data=digits", *PRESETS["nice"], "model.prior=gaussian"])
    ).double()
    x = torch.randint(0, 17, (64, 1, 8, 8))
    torch.manual_seed(0)
    k1 = torch.stack([model.bits_per_dim(x) for _ in range(16)])
    torch.manual_seed(1)
    k16 = model.bits_per_dim(x, k=16)
    diff = k1.mean(0) - k16
    assert diff.mean() >= -3 * diff.std() / math.sqrt(len(diff))


PUBLISHED = {
    # aravindsrinivas/flowpp, flows/run_cifar.py: "Params: 31,443,440".
    "flowpp_cifar10": 31_443_440,
}


def _nice_mnist_count() -> int:
    """NICE on MNIST by hand: 4 couplings of a 392 -> 1000 -> (4 x 1000) -> 392 MLP, plus 784
    scales (arXiv:1410.8516, section 5.1)."""
    half, units = 392, 1000
    mlp = (half * units + units) + 4 * (units * units + units) + (units * half + half)
    return 4 * mlp + 2 * half


@pytest.mark.parametrize(
    "experiment",
    [
        "nice_mnist",
        "nice_fashion_mnist",
        "realnvp_cifar10",
        "realnvp_fashion_mnist",
        "glow_cifar10",
        "glow_fashion_mnist",
        "flowpp_cifar10",
        "flowpp_fashion_mnist",
    ],
)
def test_experiment_composes_and_builds_with_the_papers_parameter_count(experiment):
    cfg = nfcv.compose([f"experiment={experiment}"])
    model = nfcv.build_model(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert count > 0
    if experiment in PUBLISHED:
        assert count == PUBLISHED[experiment]
    if experiment == "nice_mnist":
        assert count == _nice_mnist_count()
    if experiment == "flowpp_cifar10":
        assert isinstance(model.dequantizer, VariationalDequantization)
        assert cfg.trainer.gradient_clip_val == 1.0 and cfg.optim.optimizer.lr == 3e-4


@pytest.mark.parametrize("name", ["nice", "realnvp", "glow", "flowpp"])
def test_each_preset_learns_digits(name):
    torch.manual_seed(0)
    from nfcv.data import DigitsDataModule

    dm = DigitsDataModule(image_shape=[1, 8, 8], num_bins=17, batch_size=64, val_size=150)
    train, val = dm.split("train").images, dm.split("val").images[:128]
    # NICE's only scaling is its last layer, so it needs a larger step to move in 30 steps.
    lr = {"nice": 1e-2}.get(name, 2e-3)
    overrides = {
        "nice": ["model=nice", "model.hidden=64", "model.layers=2"],
        "realnvp": ["model=realnvp", "model.hidden=16", "model.blocks=1"],
        "glow": ["model=glow", "model.hidden=16", "model.steps=2", "model.dropout=0"],
        "flowpp": ["model=flowpp", "model.hidden=16", "model.blocks=1", "model.components=2"],
    }[name]
    model = nfcv.build_model(nfcv.compose(["data=digits", *overrides]))

    def val_bpd() -> float:
        model.eval()
        torch.manual_seed(1)
        with torch.no_grad():
            return model.bits_per_dim(val).mean().item()

    model.train()
    model.bits_per_dim(train[:64])
    before = val_bpd()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(30):
        batch = train[(step * 32) % 1024 :][:32]
        loss = model.bits_per_dim(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_bpd()
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("name", ["nice", "realnvp", "flowpp"])
def test_presets_train_checkpoint_and_reload(tmp_path, name):
    """The real Trainer for a few steps; the checkpoint rebuilds the same model (per-position
    ActNorm, batch-norm statistics and the variational dequantizer included)."""
    from nfcv.training.run import train

    cfg = nfcv.compose(
        [
            "data=digits",
            *PRESETS[name],
            *VARIATIONAL,
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false",
            "sample.every_n_steps=3",
            "sample.per_row=2",
            "data.batch_size=16",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 3 and 0 < summary["test_bpd"] < 10
    loaded, again = nfcv.load(summary["best_ckpt"]), nfcv.load(summary["best_ckpt"])
    assert all(bool(m.initialized) for m in loaded.modules() if isinstance(m, ActNorm))
    x = torch.randint(0, 17, (4, 1, 8, 8))
    torch.manual_seed(0)
    a = loaded.bits_per_dim(x)
    torch.manual_seed(0)
    torch.testing.assert_close(again.bits_per_dim(x), a)
    y = torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(loaded.inverse(loaded.transform(y)[0]), y, atol=1e-4, rtol=0)


def test_nice_scaling_data_init_gives_unit_variance_and_survives_reload():
    from nfcv.flows import VectorScale

    layer = VectorScale(6, data_init=True)
    x = torch.randn(256, 6) * torch.tensor([0.1, 1, 3, 10, 0.5, 0.0]) + 2
    layer.train()
    z, logdet = layer(x)
    torch.testing.assert_close(z[:, :5].std(0), torch.ones(5, dtype=z.dtype), atol=1e-5, rtol=0)
    assert layer.log_scale[5] == 0  # a constant dimension keeps scale 1
    torch.testing.assert_close(logdet, layer.log_scale.sum().expand(256))
    again = VectorScale(6, data_init=True)
    again.load_state_dict(layer.state_dict())
    again.train()
    torch.testing.assert_close(again(x)[0], z)  # initialised already: no second init
