"""Scale-out: DDP on CPU processes, sweeps through submitit, exact resume and preemption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _tiny_overrides

import nfcv
from nfcv.data.samplers import ResumableShuffle, ShardedSequential
from nfcv.errors import CheckpointError, ConfigError
from nfcv.training.resume import resume_checkpoint

BIN = Path(sys.executable).parent
TESTS = Path(__file__).parent


def _env(cwd: Path) -> dict[str, str]:
    # One thread per process: these tests start several torch processes on 2 cores.
    return {**os.environ, "NFCV_CACHE": str(cwd / "cache"), "OMP_NUM_THREADS": "1"}


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = dict(state["state_dict"])
    for i, opt in enumerate(state["optimizer_states"]):
        for pid, slots in opt["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    out[f"opt{i}.{pid}.{name}"] = value
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_samplers_split_the_data_exactly(monkeypatch):
    import nfcv.data.samplers as resume

    for world in (1, 2, 3):
        shards = []
        for rank in range(world):
            monkeypatch.setattr(resume, "_rank_world", lambda r=rank, w=world: (r, w))
            shards.append(list(ShardedSequential(10)))
        assert sorted(sum(shards, [])) == list(range(10))  # each image once, no padding
    monkeypatch.setattr(resume, "_rank_world", lambda: (0, 1))
    sampler = ResumableShuffle(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10)) and first == list(ResumableShuffle(10, seed=3))
    second = list(sampler)
    assert second != first  # a new order every epoch, counted by the sampler itself
    assert len(list(ResumableShuffle(10, seed=2**64 - 1))) == 10  # an unseeded torch's seed
    sampler.set_epoch(7)  # Lightning's counter is ignored
    sampler.resume_at(0, skip=4)
    assert list(sampler) == first[4:] and list(sampler) == second  # skip applies once


def test_resume_requests_are_checked(tmp_path):
    assert resume_checkpoint(tmp_path, "auto", None) is None
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_checkpoint(tmp_path, True, None)
    with pytest.raises(ConfigError, match="nothing to resume"):
        resume_checkpoint(tmp_path, None, "last")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        resume_checkpoint(tmp_path, "auto", None)
    torch.save({"state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(tmp_path, "auto", None).endswith("last.ckpt")
    with pytest.raises(ConfigError, match="already holds a run"):
        resume_checkpoint(tmp_path, None, None)


@pytest.mark.parametrize("stop_at", [2, 3], ids=["epoch-boundary", "mid-epoch"])
def test_resume_replays_the_uninterrupted_run_exactly(tmp_path, stop_at):
    """512-image batches: 2 steps per epoch. Stop after `stop_at` steps, resume to 6: the
    weights and the optimizer state equal those of one run of 6 steps, bit for bit."""
    from nfcv.training.run import train

    common = _tiny_overrides(
        **{
            "data.batch_size": "512",
            "trainer.val_check_interval": "1",
            "optim.decay": "none",
            "optim.warmup_steps": "2",
            "sample.every_n_steps": "100",
        }
    )
    whole = train(nfcv.compose([*common, "trainer.max_steps=6"]), run_dir=tmp_path / "whole")
    part = tmp_path / "part"
    train(nfcv.compose([*common, f"trainer.max_steps={stop_at}"]), run_dir=part)
    resumed = train(nfcv.compose([*common, "trainer.max_steps=6", "resume=auto"]), run_dir=part)
    assert resumed["steps"] == whole["steps"] == 6
    _assert_same(_weights(Path(whole["last_ckpt"])), _weights(Path(resumed["last_ckpt"])))
    assert resumed["best_val_bpd"] == pytest.approx(whole["best_val_bpd"], abs=0)


def test_sigterm_saves_and_the_requeued_job_resumes_exactly(tmp_path):
    args = [
        *_tiny_overrides(
            **{
                "trainer.max_steps": "120",
                "trainer.val_check_interval": "1000",
                "optim.decay": "none",
                "sample.every_n_steps": "1000",
            }
        ),
        "trainer.log_every_n_steps=1",
    ]
    train = str(BIN / "nfcv-train")
    env = _env(tmp_path)

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [train, *args, *extra],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    whole = run("hydra.run.dir=whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(
        [train, *args, "hydra.run.dir=part", "resume=auto"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Wait until training has started (TensorBoard has a few train/bpd points), then SIGTERM.
    tb = tmp_path / "part" / "tb"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        events = list(tb.glob("events.out.*")) if tb.is_dir() else []
        if events and events[0].stat().st_size > 3000:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM" in out
    status = json.loads((tmp_path / "part" / "status.json").read_text())
    assert status["status"] == "preempted" and 0 < status["steps"] < 120
    again = run("hydra.run.dir=part", "resume=auto")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resume=auto: " in again.stdout and "last.ckpt" in again.stdout
    _assert_same(
        _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"),
        _weights(tmp_path / "part" / "checkpoints" / "last.ckpt"),
    )


def test_ddp_cpu_two_processes_keep_identical_parameters(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TESTS / "ddp_worker.py"), str(tmp_path)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for tag in ("first", "last"):
        r0 = torch.load(tmp_path / f"{tag}-rank0.pt", weights_only=True)
        r1 = torch.load(tmp_path / f"{tag}-rank1.pt", weights_only=True)
        _assert_same(r0, r1)
    # The ranks scored 76 and 75 of the 151 validation images; the reduced figure is the same
    # on both.
    counts = [(tmp_path / f"val-count-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert [c[0] for c in counts] == ["76", "75"]
    assert counts[0][1] == counts[1][1]


def test_local_submitit_sweep_reports_each_job_and_names_the_failed_one(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    args = [
        "-m",
        "hydra/launcher=local",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *_tiny_overrides(**{"model.levels": "1,2,4"}),  # levels=4 cannot divide 8x8 images
    ]
    proc = subprocess.run(
        [str(BIN / "nfcv-train"), *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "1 of 3 jobs did not complete" in out
    assert "job 2 (model.levels=4" in out and "log: " in out
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints" / "last.ckpt").is_file()
        assert (
            json.loads((tmp_path / "sweep" / job / "status.json").read_text())["status"]
            == "completed"
        )
    failed = json.loads((tmp_path / "sweep" / "2" / "status.json").read_text())
    assert failed["status"] == "failed" and "divisible" in failed["error"]
    assert any(Path(p).is_file() for p in failed["log"])
    table = subprocess.run(
        [
            sys.executable,
            str(TESTS.parent / "scripts" / "summarize_sweep.py"),
            str(tmp_path / "sweep"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert table.returncode == 1  # not every job completed
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["job", "overrides", "status"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"0", "1", "2"}
    assert "completed" in rows["0"] and "failed" in rows["2"]


def test_a_requeued_sweep_job_continues_from_its_folder(tmp_path):
    """SLURM requeues a job into its own sweep folder: with resume unset, a job under -m runs
    with resume=auto, so the second start continues from last.ckpt (to step 4) where it used to
    refuse the folder as holding a run. An explicit resume=null-like choice (resume=false) is
    not overridden."""

    def sweep(steps: int, *extra: str) -> subprocess.CompletedProcess:
        args = [
            "-m",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *_tiny_overrides(**{"trainer.max_steps": str(steps)}),
            *extra,
        ]
        return subprocess.run(
            [str(BIN / "nfcv-train"), *args],
            cwd=tmp_path,
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = sweep(2)
    assert first.returncode == 0, first.stderr[-3000:]
    again = sweep(4)
    assert again.returncode == 0, again.stderr[-3000:]
    status = json.loads((tmp_path / "sweep" / "0" / "status.json").read_text())
    assert status["status"] == "completed" and status["steps"] == 4, status
    refused = sweep(6, "resume=false")
    status = json.loads((tmp_path / "sweep" / "0" / "status.json").read_text())
    assert refused.returncode != 0 and status["status"] == "failed"
    assert "already holds a run" in status["error"]


TRANSFORMER_AND_RESIDUAL = {
    "tarflow": ["model=tarflow", "model.width=16", "model.head_dim=8", "model.blocks=2"],
    "jet": ["model=jet", "model.couplings=3", "model.width=8", "model.heads=2"],
    "resflow": ["model=resflow", "model.blocks=[1,1]", "model.hidden=8", "model.fc_blocks=1"],
}


@pytest.mark.parametrize("name", sorted(TRANSFORMER_AND_RESIDUAL))
def test_the_newer_presets_resume_exactly(tmp_path, name):
    """TarFlow, Jet and the residual flow (whose Russian-roulette draws come from Python's
    random state) resume mid-run to the weights and optimizer state of the uninterrupted run."""
    from nfcv.training.run import train

    base = {
        "trainer.max_steps": "4",
        "trainer.val_check_interval": "2",
        "trainer.enable_progress_bar": "false",
        "trainer.accelerator": "cpu",
        "sample.every_n_steps": "100",
        "sample.per_row": "2",
        "data.batch_size": "16",
        "optim.decay": "none",
        "optim.warmup_steps": "2",
    }
    common = [*TRANSFORMER_AND_RESIDUAL[name], *[f"{k}={v}" for k, v in base.items()]]
    whole = train(nfcv.compose(common), run_dir=tmp_path / "whole")
    part = tmp_path / "part"
    train(nfcv.compose([*common, "trainer.max_steps=2"]), run_dir=part)
    resumed = train(nfcv.compose([*common, "resume=auto"]), run_dir=part)
    assert resumed["steps"] == whole["steps"] == 4
    _assert_same(_weights(Path(whole["last_ckpt"])), _weights(Path(resumed["last_ckpt"])))
