"""Gaussian noise augmentation (``dequant=gaussian``, TarFlow arXiv:2412.06329) and one-step
score-based denoising (Tweedie's formula): the figure it gives, how nfcv-eval labels it, and
denoising checked against closed forms; the commands end to end."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import _fails, run

import nfcv
from nfcv.dequant import GaussianDequantization, UniformDequantization
from nfcv.errors import ConfigError
from nfcv.evaluate import LOGDET, bits_per_dim_parts
from nfcv.flows import DiagAffine, Flatten, Sequential
from nfcv.model import ImageFlow

SHAPE = (2, 2, 3)
D = 12
LOG_2PI = math.log(2 * math.pi)


def _affine_model(log_scale, shift, dequantizer=None) -> ImageFlow:
    """``eps = y * exp(log_scale) + shift`` per sub-pixel: p(y) = N(y; -shift e^-s, e^-2s)."""
    layer = DiagAffine(SHAPE[0], *SHAPE[1:])
    model = ImageFlow(Sequential([layer, Flatten(SHAPE)]), SHAPE, 17, dequantizer=dequantizer)
    model = model.double().eval()
    with torch.no_grad():
        layer.log_scale.copy_(torch.as_tensor(log_scale, dtype=torch.float64).expand(1, *SHAPE))
        layer.shift.copy_(torch.as_tensor(shift, dtype=torch.float64).expand(1, *SHAPE))
    return model


# ---------------------------------------------------------------------------------------------
# The figure


def test_gaussian_dequantizer_noises_bin_centres_and_has_no_log_q():
    deq = GaussianDequantization(0.1)
    x = torch.randint(0, 17, (4, *SHAPE)).double()
    torch.manual_seed(3)
    y, log_q = deq(x, 17)
    torch.manual_seed(3)
    noise = torch.randn_like(x)
    torch.testing.assert_close(y, (x + 0.5) / 17 + 0.1 * noise, atol=1e-15, rtol=0)
    assert torch.equal(log_q, torch.zeros(4, dtype=torch.float64))
    assert not deq.discrete_bound and not deq.bounded
    assert UniformDequantization.discrete_bound and UniformDequantization.bounded


def test_bits_per_dim_is_the_continuous_density_of_the_noised_images_by_hand():
    s = torch.linspace(-0.5, 0.7, D).view(SHAPE)
    b = torch.linspace(0.3, -0.2, D).view(SHAPE)
    model = _affine_model(s, b, GaussianDequantization(0.07))
    x = torch.randint(0, 17, (5, *SHAPE))
    torch.manual_seed(8)
    bpd = model.bits_per_dim(x)
    torch.manual_seed(8)
    total, parts = bits_per_dim_parts(model, x)
    torch.manual_seed(8)  # the same noise, by hand: y = (x + 1/2) / 17 + 0.07 n
    y = (x.double() + 0.5) / 17 + 0.07 * torch.randn(x.shape, dtype=torch.float64)
    eps = y * s.double().exp() + b.double()
    log_p = -0.5 * (eps.pow(2) + LOG_2PI).flatten(1).sum(1) + s.double().sum()
    by_hand = -log_p / (D * math.log(2))  # no log2(num_bins), no log q
    torch.testing.assert_close(bpd, by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(total, by_hand, atol=1e-12, rtol=0)
    assert list(parts) == ["latent", LOGDET]  # no dequantization, no discretization part
    torch.testing.assert_close(
        parts[LOGDET], torch.full_like(total, -s.sum().item() / (D * math.log(2)))
    )
    # The same model with uniform noise adds log2(17): a discrete bound, on other noise.
    uniform = _affine_model(s, b)
    assert uniform.discrete_bound and not model.discrete_bound
    assert "not a discrete bits-per-dim bound" in model.figure()
    assert "x + N(0, 0.07^2)" in model.figure() and "continuous" not in uniform.figure()


def test_importance_samples_are_refused_for_gaussian_noise():
    model = _affine_model(0.0, 0.0, GaussianDequantization(0.05))
    with pytest.raises(ValueError, match="k=4.*Gaussian noise.*use k=1"):
        model.bits_per_dim(torch.randint(0, 17, (2, *SHAPE)), k=4)


@pytest.mark.parametrize("std", [0, -0.1, float("nan"), float("inf"), "a"])
def test_bad_noise_std_is_refused(std):
    with pytest.raises(ValueError, match="noise_std"):
        GaussianDequantization(std)


def test_config_refuses_bad_std_and_a_logit_model():
    cfg = nfcv.compose(["dequant=gaussian"])
    assert cfg.dequant.noise_std == 0.05
    assert nfcv.build_model(cfg).noise_std == 0.05
    with pytest.raises(ConfigError, match=r"dequant.noise_std=0.0: must be a number > 0"):
        nfcv.compose(["dequant=gaussian", "dequant.noise_std=0"])
    for name in ("realnvp", "flowpp"):
        with pytest.raises(ConfigError, match="logit takes \\[0, 1\\] only.*model=glow"):
            nfcv.compose(["dequant=gaussian", f"model={name}"])
    # Built by hand past the config check: the model refuses too.
    from nfcv.flows import Logit

    with pytest.raises(ValueError, match="logit preprocessing"):
        ImageFlow(Flatten(SHAPE), SHAPE, 17, GaussianDequantization(), preprocess=Logit())


# ---------------------------------------------------------------------------------------------
# Denoising


def test_tweedie_denoising_is_the_posterior_mean_for_gaussian_data():
    """Clean data N(mu, tau^2) per sub-pixel, noised by sigma: the noised density is
    N(mu, tau^2 + sigma^2), which an affine flow fitted by maximum likelihood (the sample mean
    and variance of the noised data) represents exactly. Tweedie's formula must then give the
    posterior mean E[x | y] = (tau^2 y + sigma^2 mu) / (tau^2 + sigma^2), and bring noised
    samples closer to their clean images: mean squared error tau^2 sigma^2 / (tau^2 + sigma^2)
    in place of sigma^2."""
    gen = torch.Generator().manual_seed(0)
    mu, tau, sigma, n = 0.4, 0.08, 0.06, 20000
    clean = mu + tau * torch.randn(n, *SHAPE, generator=gen, dtype=torch.float64)
    noised = clean + sigma * torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    mean, var = noised.mean(0), noised.var(0, unbiased=False)  # the maximum-likelihood fit
    model = _affine_model(-0.5 * var.log(), -mean / var.sqrt(), GaussianDequantization(sigma))
    denoised = model.denoise(noised)  # sigma from the model: its noise_std
    posterior = (var - sigma**2) / var * noised + sigma**2 / var * mean
    torch.testing.assert_close(denoised, posterior, atol=1e-12, rtol=0)
    exact = (tau**2 * noised + sigma**2 * mu) / (tau**2 + sigma**2)
    assert (denoised - exact).abs().max() < 5e-3  # the fit is close to the truth
    before = (noised - clean).pow(2).mean().item()
    after = (denoised - clean).pow(2).mean().item()
    assert before == pytest.approx(sigma**2, rel=0.02)
    assert after == pytest.approx(tau**2 * sigma**2 / (tau**2 + sigma**2), rel=0.03)
    assert after < 0.7 * before


def test_score_of_a_glow_is_the_gradient_of_its_log_density():
    """The score through a real multi-scale flow (preprocessing, couplings, 1x1 convs, split
    priors and their log-dets) against central differences of `log_prob`, in float64."""
    model = nfcv.build_model(nfcv.compose(["model.hidden=8", "model.steps=1", "model.levels=2"]))
    model.train()
    model.bits_per_dim(torch.randint(0, 17, (16, 1, 8, 8)))  # ActNorm's data init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = model.double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    score = model.score(x)
    h = 1e-6
    for index in [(0, 0, 0, 0), (0, 0, 3, 5), (1, 0, 7, 2)]:
        e = torch.zeros_like(x)
        e[index] = h
        fd = (model.log_prob(x + e) - model.log_prob(x - e)) / (2 * h)
        assert fd[index[0]].item() == pytest.approx(score[index].item(), rel=1e-5, abs=1e-6)
        other = 1 - index[0]  # the other image's density does not depend on this pixel
        assert abs(fd[other].item()) < 1e-6


def test_sample_with_denoise_is_tweedie_on_the_draws_before_the_clamp():
    var, m = 0.04, 0.5
    model = _affine_model(-0.5 * math.log(var), -m / math.sqrt(var), GaussianDequantization(0.1))
    gen = torch.Generator().manual_seed(1)
    plain = model.inverse(0.7 * torch.randn(6, D, generator=gen, dtype=torch.float64))
    out = model.sample(6, 0.7, generator=torch.Generator().manual_seed(1), denoise_sigma=0.1)
    expected = plain + 0.1**2 * (m - plain) / var  # the score of N(m, var)
    torch.testing.assert_close(out, expected.clamp(0, 1), atol=1e-12, rtol=0)
    assert not torch.equal(out, plain.clamp(0, 1))


def test_denoise_without_a_noise_level_is_a_clear_error():
    model = _affine_model(0.0, 0.0)  # uniform dequantization: no noise_std
    x = torch.rand(2, *SHAPE, dtype=torch.float64)
    assert model.noise_std is None
    with pytest.raises(ValueError, match="trained without Gaussian noise.*sigma="):
        model.denoise(x)
    torch.testing.assert_close(model.denoise(x, 0.1), x + 0.01 * (-x), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        model.denoise(x, 0.0)


# ---------------------------------------------------------------------------------------------
# The commands


@pytest.fixture(scope="module")
def gaussian_run(tmp_path_factory):
    """One tiny in-process training run with ``dequant=gaussian``, and what it printed."""
    from conftest import _tiny_overrides

    from nfcv.training.run import train

    run_dir = tmp_path_factory.mktemp("noise") / "run"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train(nfcv.compose(["dequant=gaussian", *_tiny_overrides()]), run_dir=run_dir)
    return summary, out.getvalue()


def _eval(*overrides: str) -> dict:
    from nfcv.cli.eval import evaluate

    return evaluate(nfcv.compose(["progress=false", *overrides], config_name="eval"))


def _sample(*overrides: str):
    from nfcv.cli.sample import sample

    return sample(nfcv.compose(list(overrides), config_name="sample"))


def test_training_labels_its_figure_continuous(gaussian_run):
    summary, printed = gaussian_run
    assert "test continuous bpd" in printed and "best val continuous bpd" in printed
    assert "x + N(0, 0.05^2)" in printed and "not a discrete bits-per-dim bound" in printed
    status = json.loads((Path(summary["run_dir"]) / "status.json").read_text())
    assert "not a discrete bits-per-dim bound" in status["figure"]
    assert math.isfinite(status["test_bpd"])


def test_eval_labels_a_gaussian_noise_model(gaussian_run, tmp_path, capsys):
    ckpt = gaussian_run[0]["best_ckpt"]
    record = _eval(f"ckpt={ckpt}", f"out={tmp_path / 'e.json'}")
    line = capsys.readouterr().out.splitlines()[0]
    assert "continuous bits per dim of x + N(0, 0.05^2)" in line, line
    assert "not a discrete bits-per-dim bound" in line and not line.endswith("bits/dim")
    assert json.loads((tmp_path / "e.json").read_text()) == record
    assert record["discrete_bound"] is False and record["noise_std"] == 0.05
    assert "not a discrete bits-per-dim bound" in record["figure"]
    parts = [row["part"] for row in record["breakdown"]]
    assert not any("num_bins" in p or "dequantization" in p for p in parts), parts
    assert sum(row["bpd"] for row in record["breakdown"]) == pytest.approx(record["bpd"])
    with pytest.raises(ConfigError, match="k=4.*Gaussian noise.*use k=1"):
        _eval(f"ckpt={ckpt}", "k=4", f"out={tmp_path / 'k.json'}")


@pytest.mark.slow
def test_eval_compares_no_continuous_figure_with_a_discrete_bound(
    gaussian_run, tiny_run, tmp_path, capsys
):
    ckpt = gaussian_run[0]["best_ckpt"]
    same = _eval(f"ckpt=[{ckpt},{ckpt}]", f"out={tmp_path / 'c.json'}")
    assert "diff_vs_first" in same["comparison"][1]
    mixed = _eval(f"ckpt=[{tiny_run['best_ckpt']},{ckpt}]", f"out={tmp_path / 'd.json'}")
    assert "diff_vs_first" not in mixed["comparison"][1]
    assert [r["discrete_bound"] for r in mixed["comparison"]] == [True, False]
    assert "(continuous)" in capsys.readouterr().out.split("checkpoints")[-1]


def test_eval_label_unchanged_for_uniform(tiny_run, tmp_path, capsys):
    record = _eval(f"ckpt={tiny_run['best_ckpt']}", f"out={tmp_path / 'u.json'}")
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(
        f"{record['bpd']:.4f} +/- {record['bpd_stderr']:.4f} bits/dim"
    )
    assert "continuous" not in out and "continuous" not in record["figure"]
    assert record["discrete_bound"] is True and "noise_std" not in record
    parts = [row["part"] for row in record["breakdown"]]
    assert "discretization log2(num_bins)" in parts and "dequantization log q(u|x)" in parts


def test_sample_denoise_grid_and_its_errors(gaussian_run, tmp_path, capsys):
    ckpt = gaussian_run[0]["best_ckpt"]
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _sample(f"ckpt={ckpt}", "n=4", f"out={a}")
    _sample(f"ckpt={ckpt}", "n=4", f"out={b}", "denoise=true")
    assert "denoised by Tweedie's formula (sigma 0.05)" in capsys.readouterr().out
    assert a.read_bytes() != b.read_bytes()
    with pytest.raises(ConfigError, match="mode=reconstruct"):
        _sample(f"ckpt={ckpt}", "mode=reconstruct", "denoise=true", f"out={tmp_path / 'r.png'}")
    with pytest.raises(ConfigError, match="add denoise=true"):
        _sample(f"ckpt={ckpt}", "denoise_sigma=0.1", f"out={tmp_path / 'x.png'}")
    with pytest.raises(ConfigError, match="denoise_sigma must be a number > 0"):
        _sample(f"ckpt={ckpt}", "denoise=true", "denoise_sigma=-1", f"out={tmp_path / 'x.png'}")


@pytest.mark.slow
def test_sample_denoise_in_npz_and_interpolate_modes(gaussian_run, tmp_path):
    ckpt = gaussian_run[0]["best_ckpt"]
    s, t = tmp_path / "s.npz", tmp_path / "t.npz"
    _sample(f"ckpt={ckpt}", "mode=npz", "n=3", f"out={s}", "denoise=true")
    _sample(f"ckpt={ckpt}", "mode=npz", "n=3", f"out={t}")
    with np.load(s) as ds, np.load(t) as dt:
        assert ds["images"].shape == (3, 1, 8, 8)
        assert not np.array_equal(ds["images_float"], dt["images_float"])
    i = tmp_path / "i.png"
    _sample(f"ckpt={ckpt}", "mode=interpolate", "steps=3", f"out={i}", "denoise=true")
    assert i.is_file()


def test_sample_denoise_on_a_uniform_checkpoint_needs_sigma(tiny_run, tmp_path):
    ckpt = tiny_run["best_ckpt"]
    with pytest.raises(ConfigError, match="trained without Gaussian noise.*denoise_sigma=S"):
        _sample(f"ckpt={ckpt}", "denoise=true", f"out={tmp_path / 'x.png'}")
    assert not (tmp_path / "x.png").exists()
    _sample(f"ckpt={ckpt}", "denoise=true", "denoise_sigma=0.05", f"out={tmp_path / 'x.png'}")
    assert (tmp_path / "x.png").is_file()


@pytest.mark.slow
def test_commands_end_to_end_with_gaussian_noise(tiny_run, tmp_path):
    """nfcv-train dequant=gaussian, nfcv-eval and nfcv-sample denoise=true as subprocesses, and
    denoise=true on a uniform checkpoint exits 2 with a message."""
    from conftest import _tiny_overrides

    proc = run(
        "nfcv-train", "dequant=gaussian", *_tiny_overrides(), "hydra.run.dir=run", cwd=tmp_path
    )
    assert "test continuous bpd" in proc.stdout
    ev = run("nfcv-eval", "ckpt=run", "progress=false", "out=e.json", cwd=tmp_path)
    assert "continuous bits per dim of x + N(0, 0.05^2)" in ev.stdout.splitlines()[0]
    _fails(run("nfcv-eval", "ckpt=run", "k=4", cwd=tmp_path, check=False), "use k=1")
    den = run("nfcv-sample", "ckpt=run", "n=4", "out=b.png", "denoise=true", cwd=tmp_path)
    assert "sigma 0.05" in den.stdout and (tmp_path / "b.png").is_file()
    ckpt = tiny_run["best_ckpt"]
    proc = run(
        "nfcv-sample", f"ckpt={ckpt}", "denoise=true", "out=x.png", cwd=tmp_path, check=False
    )
    _fails(proc, "trained without Gaussian noise", "denoise_sigma=")
    assert not (tmp_path / "x.png").exists()


def test_checkpoint_and_export_keep_the_noise_level(gaussian_run, tmp_path):
    """A gaussian checkpoint rebuilds its dequantizer from the file alone, and so does its
    safetensors export: the same noise level, the same continuous figure, the same score."""
    from nfcv.checkpoint import export_safetensors

    ckpt = gaussian_run[0]["best_ckpt"]
    out = export_safetensors(ckpt, tmp_path / "m.safetensors")
    a, b = nfcv.load(ckpt), nfcv.load(out)
    for model in (a, b):
        assert isinstance(model.dequantizer, GaussianDequantization)
        assert model.noise_std == 0.05 and not model.discrete_bound
    x = torch.randint(0, 17, (3, 1, 8, 8))
    torch.manual_seed(4)
    first = a.bits_per_dim(x)
    torch.manual_seed(4)
    torch.testing.assert_close(b.bits_per_dim(x), first)
    y = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(a.denoise(y), b.denoise(y))


def test_denoise_refuses_interpolating_a_class_conditional_model():
    """The path's images have a density only given a class: a clear error, before any work."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from nfcv.cli.sample import _denoise_sigma
    from nfcv.errors import ConfigError

    cfg = OmegaConf.create({"denoise": True, "denoise_sigma": None})
    model = SimpleNamespace(num_classes=10, noise_std=0.05)
    with pytest.raises(ConfigError, match="class-conditional"):
        _denoise_sigma(cfg, model, "interpolate")
    assert _denoise_sigma(cfg, model, "grid") == 0.05
