"""nfcv-sample's modes: interpolation, reconstruction and raw samples, in process and as
subprocesses; bad values are clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli import _fails, run

import nfcv
from nfcv.errors import ConfigError
from nfcv.grid import (
    draw_samples,
    interpolate_latents,
    interpolation_grid,
    quantise,
    reconstruct,
    reconstruction_grid,
)


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> Path:
    return Path(tiny_run["best_ckpt"])


@pytest.fixture(scope="module")
def model(ckpt):
    return nfcv.load(ckpt)


@pytest.fixture(scope="module")
def digits(model):
    from hydra.utils import instantiate

    return instantiate(model.config.data).split("test").images


def _sample_cfg(*overrides: str):
    return nfcv.compose(list(overrides), config_name="sample")


@pytest.mark.parametrize("path", ["spherical", "linear"])
def test_interpolation_endpoints_are_the_latents_exactly(path):
    a, b = torch.randn(64), torch.randn(64)
    line = interpolate_latents(a, b, 5, path)
    assert line.shape == (5, 64)
    assert torch.equal(line[0], a) and torch.equal(line[-1], b)
    if path == "spherical":
        # slerp between latents of equal norm stays on that sphere (the line dips inside).
        b = b * a.norm() / b.norm()
        norms = interpolate_latents(a, b, 7, path).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, a.norm().item()))
        assert interpolate_latents(a, b, 7, "linear").norm(dim=1)[3] < a.norm() - 1e-3


def test_interpolation_endpoints_decode_to_the_encoded_images(model, digits):
    grid, error = interpolation_grid(model, digits[:3], steps=4)
    assert error < 1e-5  # float32 rounding of an exact inverse
    assert grid.shape == (3, 2 * 9 + 1, 4 * 9 + 1)  # 2 segments of 4 images, 8x8 + padding
    # And the decoded endpoints quantise back to the very images.
    x, x_rec = reconstruct(model, digits[:3])
    assert torch.equal(quantise(model, x_rec), digits[:3].long())


def test_reconstructions_equal_the_inputs_to_float32_precision(model, digits):
    x, x_rec = reconstruct(model, digits[:10])
    assert (x_rec - x).abs().max() < 1e-5
    grid, error = reconstruction_grid(model, digits[:10], nrow=4)
    assert error == pytest.approx((x_rec - x).abs().max().item())
    # 10 images, 4 to a row: 3 rows of images, each followed by its reconstructions.
    assert grid.shape == (3, 6 * 9 + 1, 4 * 9 + 1)


def test_raw_samples_are_deterministic_and_quantised(model):
    images, temps = draw_samples(model, [0.5, 1.0], 5, batch_size=2, seed=3)
    again, _ = draw_samples(model, [0.5, 1.0], 5, batch_size=2, seed=3)
    other, _ = draw_samples(model, [0.5, 1.0], 5, batch_size=2, seed=4)
    assert images.shape == (10, 1, 8, 8) and torch.equal(images, again)
    assert not torch.equal(images, other)
    assert temps.tolist() == [0.5] * 5 + [1.0] * 5
    levels = quantise(model, images)
    assert levels.min() >= 0 and levels.max() <= 16
    assert torch.equal(levels, (images * 17).floor().clamp(0, 16).long())


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["mode=movie"], "unknown mode='movie'"),
        (["mode=interpolate", "steps=1"], "steps must be >= 2"),
        (["mode=interpolate", "index=[3]"], "at least 2 images"),
        (["mode=interpolate", "path=curved"], "unknown path='curved'"),
        (["mode=interpolate", "index=[0,5000]"], r"index \[5000\] out of range"),
        (["temperature=[]"], "temperature must be one or more"),
        (["n=0"], "n must be >= 1"),
        (["mode=reconstruct", "data=mnist"], r"data=mnist has images of shape \(1, 28, 28\)"),
    ],
)
def test_bad_values_are_config_errors(ckpt, overrides, match):
    from nfcv.cli.sample import sample

    with pytest.raises(ConfigError, match=match):
        sample(_sample_cfg(f"ckpt={ckpt}", *overrides))


def test_several_checkpoints_are_refused(tiny_run):
    from nfcv.cli.sample import sample

    cfg = _sample_cfg(f"ckpt=[{tiny_run['best_ckpt']},{tiny_run['last_ckpt']}]")
    with pytest.raises(ConfigError, match="one checkpoint"):
        sample(cfg)


# ---------------------------------------------------------------------------------------------
# Subprocesses, end to end


def _printed_error(stdout: str) -> float:
    return float(re.search(r"max abs error ([0-9.e+-]+)", stdout).group(1))


def test_interpolate_end_to_end(tiny_run, tmp_path):
    out = tmp_path / "interp.png"
    proc = run(
        "nfcv-sample",
        f"ckpt={tiny_run['run_dir']}",  # a run folder: its best checkpoint
        "mode=interpolate",
        "index=[0,4,7]",
        "steps=5",
        "path=linear",
        f"out={out}",
        cwd=tmp_path,
    )
    assert str(out) in proc.stdout and "endpoints decode" in proc.stdout
    assert _printed_error(proc.stdout) < 1e-5
    with Image.open(out) as img:
        assert img.size == (5 * 9 + 1, 2 * 9 + 1)


def test_reconstruct_end_to_end(ckpt, tmp_path):
    proc = run("nfcv-sample", f"ckpt={ckpt}", "mode=reconstruct", "n=6", "nrow=3", cwd=tmp_path)
    out = ckpt.parent.parent / "samples" / f"{ckpt.stem}.reconstruct.png"
    assert str(out) in proc.stdout
    assert _printed_error(proc.stdout) < 1e-5
    with Image.open(out) as img:
        assert img.size == (3 * 9 + 1, 4 * 9 + 1)


def test_npz_end_to_end(ckpt, model, tmp_path):
    out = tmp_path / "s.npz"
    proc = run(
        "nfcv-sample",
        f"ckpt={ckpt}",
        "mode=npz",
        "n=5",
        "temperature=[0.5,1.0]",
        "batch_size=2",
        "seed=3",
        f"out={out}",
        cwd=tmp_path,
    )
    assert str(out) in proc.stdout
    data = np.load(out)
    assert data["images"].dtype == np.uint8 and data["images"].shape == (10, 1, 8, 8)
    assert data["images_float"].dtype == np.float32 and int(data["num_bins"]) == 17
    assert data["temperature"].tolist() == [0.5] * 5 + [1.0] * 5
    # The same seed and batch size in process give the same samples.
    images, _ = draw_samples(model, [0.5, 1.0], 5, batch_size=2, seed=3)
    np.testing.assert_array_equal(data["images_float"], images.numpy())
    np.testing.assert_array_equal(data["images"], quantise(model, images).numpy())


def test_bad_mode_exits_2_without_traceback(ckpt, tmp_path):
    proc = run(
        "nfcv-sample", f"ckpt={ckpt}", "mode=interpolate", "steps=1", cwd=tmp_path, check=False
    )
    _fails(proc, "steps must be >= 2")
