"""The three commands end to end, as subprocesses, and every bad input the issue lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def run(cmd: str, *args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "NFCV_CACHE": str(cwd / "cache"), "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [str(BIN / cmd), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny nfcv-train run, shared by the sample and eval tests."""
    from conftest import _tiny_overrides

    cwd = tmp_path_factory.mktemp("cli")
    proc = run("nfcv-train", *_tiny_overrides(), "hydra.run.dir=outputs/run", cwd=cwd)
    return cwd, proc


def test_train_prints_where_everything_is(trained):
    cwd, proc = trained
    run_dir = cwd / "outputs" / "run"
    out = proc.stdout
    assert "test bpd" in out
    for label in ("run folder:", "checkpoint:", "samples:", "tensorboard:"):
        assert label in out
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert list((run_dir / "checkpoints").glob("best-step*.ckpt"))
    assert (run_dir / "samples.png").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_sample_writes_png_and_same_seed_same_picture(trained):
    cwd, _ = trained
    ckpt = cwd / "outputs" / "run" / "checkpoints" / "last.ckpt"
    outs = []
    for name in ("a.png", "b.png"):
        proc = run(
            "nfcv-sample",
            f"ckpt={ckpt}",
            "n=6",
            "nrow=3",
            "temperature=[0.5,1.0]",
            "seed=3",
            f"out={cwd / name}",
            cwd=cwd,
        )
        assert str(cwd / name) in proc.stdout
        outs.append((cwd / name).read_bytes())
    assert outs[0] == outs[1]
    from PIL import Image

    with Image.open(cwd / "a.png") as img:
        # 2 temperatures x 6 samples, 3 to a row: 4 rows of 8x8 images with 1-pixel padding.
        assert img.size == (3 * 9 + 1, 4 * 9 + 1)


def test_eval_reports_bpd_with_stderr_as_json(trained):
    cwd, _ = trained
    ckpt = cwd / "outputs" / "run" / "checkpoints" / "last.ckpt"
    run("nfcv-eval", f"ckpt={ckpt}", "progress=false", f"out={cwd / 'e.json'}", cwd=cwd)
    result = json.loads((cwd / "e.json").read_text())
    assert result["num_images"] == 297 and result["split"] == "test"
    assert 0 < result["bpd"] < 5 and 0 < result["bpd_stderr"] < 0.5
    # Deterministic given the seed; the default path is beside the checkpoint.
    proc = run("nfcv-eval", f"ckpt={ckpt}", "progress=false", cwd=cwd)
    again = json.loads((ckpt.parent / "last.eval-test.json").read_text())
    assert again["bpd"] == result["bpd"]
    assert f"{result['bpd']:.4f}" in proc.stdout


def test_eval_data_override_that_does_not_apply(trained):
    cwd, _ = trained
    ckpt = cwd / "outputs" / "run" / "checkpoints" / "last.ckpt"
    proc = run("nfcv-eval", f"ckpt={ckpt}", "root=/elsewhere", cwd=cwd, check=False)
    _fails(proc, "root= does not apply", "digits")


def _fails(proc, *needles, code=2):
    text = proc.stdout + proc.stderr
    assert proc.returncode == code, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert "Traceback" not in text, text


def test_missing_dataset_files_name_path_and_fix(tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    proc = run("nfcv-train", "data=fashion_mnist", f"data.root={empty}", cwd=tmp_path, check=False)
    _fails(proc, str(empty), "download=true", "data.root")


def test_image_size_not_divisible_names_both(tmp_path):
    proc = run("nfcv-train", "model.levels=4", cwd=tmp_path, check=False)
    _fails(proc, "(1, 8, 8)", "2**4 = 16", "model.levels")


def test_unknown_config_option_is_hydras_error(tmp_path):
    proc = run("nfcv-train", "model.hiden=64", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Could not override 'model.hiden'" in proc.stderr


def test_unknown_choice_value_lists_where_choices_are(tmp_path):
    proc = run("nfcv-train", "model.coupling=splines", cwd=tmp_path, check=False)
    _fails(proc, "splines", "model.choices")


def test_pixel_values_outside_the_data_range(tmp_path):
    proc = run("nfcv-train", "data.num_bins=8", cwd=tmp_path, check=False)
    _fails(proc, "data.num_bins=8", "reach 16")


@pytest.mark.parametrize("cmd", ["nfcv-sample", "nfcv-eval"])
def test_missing_unreadable_or_absent_checkpoint(tmp_path, cmd):
    _fails(
        run(cmd, f"ckpt={tmp_path / 'nope.ckpt'}", cwd=tmp_path, check=False),
        "checkpoint not found",
        "nope.ckpt",
    )
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    _fails(run(cmd, f"ckpt={garbage}", cwd=tmp_path, check=False), "cannot read checkpoint")
    _fails(run(cmd, cwd=tmp_path, check=False), "no checkpoint given", "ckpt=")


def test_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    cwd, _ = trained
    data = (cwd / "outputs" / "run" / "checkpoints" / "last.ckpt").read_bytes()
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    _fails(run("nfcv-eval", f"ckpt={cut}", cwd=tmp_path, check=False), "truncated")
    # The original is untouched and still loads.
    import nfcv

    assert nfcv.load(cwd / "outputs" / "run" / "checkpoints" / "last.ckpt") is not None
    assert torch.is_tensor(
        torch.load(cwd / "outputs" / "run" / "checkpoints" / "last.ckpt", weights_only=True)[
            "state_dict"
        ]["model.flow.levels.0.layers.1.loc"]
    )
