"""What training writes to TensorBoard (sample and reconstruction grids, the val bpd histogram)
and scripts/plot_runs.py, which draws the curves of several runs into one PNG."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nfcv

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "plot_runs.py"


def _plot_runs():
    if "plot_runs" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("plot_runs", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["plot_runs"] = module
        spec.loader.exec_module(module)
    return sys.modules["plot_runs"]


def _events(run_dir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_training_logs_samples_reconstructions_and_a_val_histogram(tiny_run):
    """The tiny run: 4 steps, grids every 2 steps, validation every 2 steps on 150 images."""
    acc = _events(Path(tiny_run["run_dir"]))
    tags = acc.Tags()
    assert {"samples", "reconstructions"} <= set(tags["images"])
    assert [e.step for e in acc.Images("samples")] == [2, 4]
    recon = acc.Images("reconstructions")
    assert [e.step for e in recon] == [2, 4]
    # 8 val images, sample.per_row=2 to a row, each row above its reconstructions: 8 rows of
    # two 8x8 images with 1-pixel padding.
    assert (recon[0].width, recon[0].height) == (2 * 9 + 1, 8 * 9 + 1)
    hist = acc.Histograms("val/bpd_per_image")
    assert [e.step for e in hist] == [2, 4]  # not the sanity check
    assert all(e.histogram_value.num == 150 for e in hist)
    assert 3 < hist[-1].histogram_value.min <= hist[-1].histogram_value.max < 6


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The session's tiny run (val/bpd only: it logs every 10 steps) and one more that logs the
    training bpd every step, with the overrides file Hydra would have written."""
    from conftest import _tiny_overrides

    from nfcv.training.run import train

    extra = {"trainer.log_every_n_steps": "1", "model.hidden": "4"}
    run_dir = tmp_path_factory.mktemp("plots") / "run"
    train(nfcv.compose(_tiny_overrides(**extra)), run_dir=run_dir)
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        "- trainer.log_every_n_steps=1\n- model.hidden=4\n"
    )
    return Path(tiny_run["run_dir"]), run_dir


def test_load_run_reads_every_logged_value_and_the_overrides(runs):
    plot_runs = _plot_runs()
    plain, logged = runs
    run = plot_runs.load_run(logged)
    assert run.label == "trainer.log_every_n_steps=1 model.hidden=4"
    train, val = run.series["train/bpd"], run.series["val/bpd"]
    assert train.steps == [0, 1, 2, 3] and len(val.steps) == 2
    assert all(3 < v < 6 for v in train.values + val.values)
    assert all(t >= run.start for t in train.wall_time + val.wall_time)
    first = plot_runs.load_run(plain)
    assert first.label == "run" and not first.series["train/bpd"].steps


def test_plot_draws_both_runs_against_step_and_time(runs, tmp_path):
    plot_runs = _plot_runs()
    loaded = [plot_runs.load_run(r) for r in runs]
    fig = plot_runs.plot_runs(loaded, tmp_path / "p.png")
    by_step, by_time = fig.axes
    labels = [line.get_label() for line in by_step.get_lines()]
    assert labels == [
        "run (val)",
        "trainer.log_every_n_steps=1 model.hidden=4 (train)",
        "trainer.log_every_n_steps=1 model.hidden=4 (val)",
    ]
    assert list(by_step.get_lines()[1].get_xdata()) == [0, 1, 2, 3]
    minutes = by_time.get_lines()[1].get_xdata()
    assert all(m >= 0 for m in minutes) and list(minutes) == sorted(minutes)
    assert (
        by_step.get_xlabel() == "optimizer step" and by_time.get_xlabel() == "wall-clock minutes"
    )
    from PIL import Image

    with Image.open(tmp_path / "p.png") as img:
        assert img.format == "PNG" and img.size[0] > 600


def test_script_end_to_end(runs, tmp_path):
    out = tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, runs), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and out.stat().st_size > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(empty)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "no TensorBoard event files" in proc.stderr
