"""Silently wrong results and stray files: each case fails loudly or leaves nothing behind.

- ``data.num_bits`` outside 1..8 is refused by every data module at construction;
- staged copies of MNIST-family ``.gz`` files follow the content of the source, not its mtime;
- a run folder is held by one trainer at a time (``RUN/.lock``);
- ``checkpoints/last.ckpt`` that is a folder is refused before training;
- ``resume=auto`` on a truncated ``last.ckpt`` falls back to the newest good checkpoint;
- outputs (npz, safetensors, eval JSON/CSV, status, grids) are written atomically and never
  replace a file that is not nfcv's own output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from hydra.utils import instantiate

import nfcv
from nfcv.errors import ConfigError, DataError, NfcvError


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in `folder` other than `keep` (temporary files a writer failed to remove)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------
# 1. data.num_bits outside 1..8


@pytest.mark.parametrize("bits", [9, 0])
def test_num_bits_outside_1_to_8_is_refused_by_every_data_module(tmp_path, bits):
    from nfcv.data import FolderDataModule, MNISTDataModule
    from nfcv.data.images import IndexedImages

    # A folder of images is read on demand (IndexedImages): it used to shift by 8 - num_bits,
    # i.e. by -1, and train on all-zero images.
    for cls in (FolderDataModule, MNISTDataModule):
        with pytest.raises(DataError, match=rf"data\.num_bits={bits}\b.*1\.\.8"):
            cls(root=str(tmp_path), image_shape=[3, 8, 8], num_bins=2**bits, num_bits=bits)
    # Through a config, as train() builds it: the DataError itself, not Hydra's wrapper. (The
    # value set after composing: compose checks data.num_bits too, a config built in Python
    # or read from elsewhere is not composed.)
    from nfcv.training.run import build

    cfg = nfcv.compose(["data=folder", f"data.root={tmp_path}"])
    cfg.data.num_bits = bits
    with pytest.raises(DataError, match=rf"data\.num_bits={bits}\b.*1\.\.8"):
        build(cfg.data)
    with pytest.raises(DataError, match="1..8"):
        IndexedImages(source=None, num_bits=bits)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# 2. Staged MNIST-family .gz files follow the content


def test_staged_gz_follows_the_content_not_the_mtime(tmp_path, monkeypatch):
    from test_data import write_idx, write_mnist_like

    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "fashion"
    write_mnist_like(root, n_train=6, n_test=3, gz=True)
    overrides = ["data=fashion_mnist", f"data.root={root}", "data.val_size=2"]
    first = instantiate(nfcv.compose(overrides).data)
    first.setup("test")  # stages the four files

    # New content, modification time older than the staged copy: it must be staged again.
    test_gz = root / "t10k-images-idx3-ubyte.gz"
    new = np.random.default_rng(1).integers(0, 256, (3, 28, 28))
    write_idx(test_gz, new)
    os.utime(test_gz, (1_000_000, 1_000_000))
    dm = instantiate(nfcv.compose(overrides).data)
    np.testing.assert_array_equal(dm.split("test").images[:, 0].numpy(), new)

    # A truncated file, older than the staged copy: an error naming it, not the stale copy.
    train_gz = root / "train-images-idx3-ubyte.gz"
    train_gz.write_bytes(train_gz.read_bytes()[:-40])
    os.utime(train_gz, (1_000_000, 1_000_000))
    dm = instantiate(nfcv.compose(overrides).data)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------
# 3. One trainer per run folder


class _SecondTrainer(L.Callback):
    """Starts ``nfcv-train`` on the same run folder while this one trains (once)."""

    def __init__(self, run_dir: Path, overrides: list[str]):
        self.run_dir, self.overrides, self.proc = run_dir, overrides, None
        self.before: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.proc is None and trainer.global_step >= 3:  # after the checkpoint at 2
            from test_cli import run

            ckpts = self.run_dir / "checkpoints"
            self.before = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}
            self.proc = run(
                "nfcv-train",
                *self.overrides,
                f"hydra.run.dir={self.run_dir}",
                "resume=auto",
                cwd=self.run_dir.parent,
                check=False,
            )
            self.after = {p.name: p.stat().st_mtime_ns for p in ckpts.iterdir()}


def test_a_second_trainer_in_a_held_run_folder_is_refused(tmp_path, tiny):
    from nfcv.training.run import train

    run_dir = tmp_path / "run"
    overrides = tiny(**{"trainer.max_steps": "6"})
    second = _SecondTrainer(run_dir, overrides)
    summary = train(nfcv.compose(overrides), run_dir=run_dir, callbacks=[second])
    proc = second.proc
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text, text
    for needle in (str(run_dir), f"pid {os.getpid()}", socket.gethostname()):
        assert needle in text, f"{needle!r} not in:\n{text}"
    assert second.after == second.before  # the refused trainer wrote no checkpoint
    assert summary["steps"] == 6
    # Released when train() returns: the folder can be continued.
    from nfcv.training.lock import hold_run_folder

    with hold_run_folder(run_dir):
        pass


def test_the_lock_is_released_by_a_dead_holder_and_not_taken_by_other_ranks(
    tmp_path, monkeypatch
):
    from nfcv.errors import OutputError
    from nfcv.training.lock import LOCK_FILE, hold_run_folder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A previous holder killed (a requeued job): flock died with it, its record is stale.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time\n"
            f"f = open({str(run_dir / LOCK_FILE)!r}, 'a')\n"
            "fcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid 999999 on nowhere'); f.flush(); print('held', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match="pid 999999 on nowhere"), hold_run_folder(run_dir):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_run_folder(run_dir):
        record = (run_dir / LOCK_FILE).read_text()
        assert f"pid {os.getpid()}" in record and socket.gethostname() in record
        # Lightning's DDP launcher starts this script again for the other ranks: they run in the
        # folder rank 0 holds, and must not try to take it.
        monkeypatch.setenv("LOCAL_RANK", "1")
        with hold_run_folder(run_dir):
            pass
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(OutputError, match=f"pid {os.getpid()}"), hold_run_folder(run_dir):
            pass


# ---------------------------------------------------------------------------------------------
# 4. and 5. What resume finds in checkpoints/


@pytest.mark.parametrize("resume", ["auto", True, None])
def test_last_ckpt_that_is_a_folder_is_refused_at_start(tmp_path, resume):
    from nfcv.training.resume import resume_checkpoint

    folder = tmp_path / "run" / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match=r"last\.ckpt is a folder.*Remove or rename it"):
        resume_checkpoint(tmp_path / "run", resume, None)
    assert (folder / "mine.txt").read_text() == "keep"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run's folder, to damage."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run["run_dir"], run_dir)
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_auto_on_a_damaged_last_ckpt_falls_back_to_the_newest_good_one(
    run_copy, damage, caplog
):
    from nfcv.training.resume import resume_checkpoint

    ckpts = run_copy / "checkpoints"
    last = ckpts / "last.ckpt"
    data = last.read_bytes()
    bad = data[: len(data) // 2] if damage == "truncated" else b""
    last.write_bytes(bad)
    best = sorted(ckpts.glob("best-step*.ckpt"))[-1]
    with caplog.at_level("WARNING", logger="nfcv"):
        chosen = resume_checkpoint(run_copy, "auto", None)
    assert chosen == str(best)
    aside = list(ckpts.glob("last.ckpt.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == bad  # nothing lost
    assert not last.exists()
    text = caplog.text
    for needle in (str(last), "cannot be read", str(aside[0]), f"continuing from {best}"):
        assert needle in text, f"{needle!r} not in:\n{text}"


def test_resume_auto_trains_on_from_the_fallback(run_copy, tiny):
    from nfcv.training.run import train

    last = run_copy / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    summary = train(
        nfcv.compose(tiny(**{"trainer.max_steps": "6", "resume": "auto"})), run_dir=run_copy
    )
    assert summary["steps"] == 6
    assert len(list(last.parent.glob("last.ckpt.corrupt-*"))) == 1
    nfcv.load(last)  # the new last.ckpt is whole


def test_resume_auto_without_a_good_checkpoint_is_a_clear_error(run_copy):
    from nfcv.training.resume import resume_checkpoint

    ckpts = run_copy / "checkpoints"
    for path in ckpts.glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:100])
    (run_copy / "hpc_ckpt_3.ckpt").write_bytes(b"")
    before = sorted(p.name for p in ckpts.iterdir())
    with pytest.raises(NfcvError, match=r"no readable checkpoint") as err:
        resume_checkpoint(run_copy, "auto", None)
    message = str(err.value)
    for name in ("last.ckpt", "hpc_ckpt_3.ckpt", "best-step"):
        assert name in message
    assert sorted(p.name for p in ckpts.iterdir()) == before  # nothing moved


# ---------------------------------------------------------------------------------------------
# 6. Outputs: atomic, and never over a file that is not nfcv's


def _disk_full(*args, **kwargs):
    """Stands in for a writer on a full disk: writes part of the file, then fails."""
    values = (*args, *kwargs.values())
    target = next(a for a in values if isinstance(a, (str, Path)) or hasattr(a, "write"))
    if hasattr(target, "write"):
        target.write(b"PK\x03\x04 part of a file")
    else:
        Path(target).write_bytes(b"PK\x03\x04 part of a file")
    raise OSError(28, "No space left on device")


def test_sample_npz_on_a_full_disk_leaves_no_partial_file(tiny_run, tmp_path, monkeypatch):
    from nfcv.cli.sample import sample

    out = tmp_path / "samples" / "s.npz"
    cfg = nfcv.compose(
        [f"ckpt={tiny_run['best_ckpt']}", "mode=npz", "n=2", "device=cpu", f"out={out}"],
        config_name="sample",
    )
    sample(cfg)
    good = out.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        sample(cfg)
    assert out.read_bytes() == good  # the previous output whole
    assert _leftovers(out.parent, {"s.npz"}) == []


def test_export_to_a_folder_is_refused_and_a_failed_export_leaves_nothing(
    tiny_run, tmp_path, monkeypatch
):
    import safetensors.torch

    from nfcv.checkpoint import export_safetensors

    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(NfcvError, match=rf"{folder} is a folder"):
        export_safetensors(tiny_run["best_ckpt"], folder)
    assert _leftovers(tmp_path, {"weights"}) == [] and _leftovers(folder, set()) == []

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        export_safetensors(tiny_run["best_ckpt"], tmp_path / "m.safetensors")
    assert _leftovers(tmp_path, {"weights"}) == []


def test_eval_never_overwrites_a_file_that_is_not_its_own(tiny_run, tmp_path):
    from nfcv.cli.eval import evaluate

    out = tmp_path / "results.json"

    def cfg():
        return nfcv.compose(
            [
                "progress=false",
                f"ckpt={tiny_run['best_ckpt']}",
                "per_image=true",
                f"out={out}",
                "split=val",
            ],
            config_name="eval",
        )

    header = "index,label,bpd\n"  # nfcv's per-image CSV
    users_csv = tmp_path / "results.csv"
    users_csv.write_text("my notes\n")
    with pytest.raises(NfcvError, match=rf"{users_csv}.*not .*nfcv.*out=.*delete"):
        evaluate(cfg())
    assert users_csv.read_text() == "my notes\n" and not out.exists()
    users_csv.unlink()

    out.write_text('{"my": "results"}\n')
    with pytest.raises(NfcvError, match=rf"{out}.*not .*nfcv.*out=.*delete"):
        evaluate(cfg())
    assert out.read_text() == '{"my": "results"}\n' and not users_csv.exists()
    out.unlink()

    first = evaluate(cfg())  # nfcv's own outputs: rewritten by the next run
    assert users_csv.read_text().startswith(header)
    assert evaluate(cfg())["bpd"] == first["bpd"]
    assert json.loads(out.read_text())["bpd"] == first["bpd"]
    assert _leftovers(tmp_path, {"results.json", "results.csv"}) == []


def test_atomic_write_keeps_the_old_file_and_removes_its_temporary_on_failure(tmp_path):
    from nfcv.data.files import atomic_path, atomic_write_text, temporary_path

    path = tmp_path / "status.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != path
        tmp.write_text("new, half")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path, {"status.json"}) == []
    # A temporary file left by a writer that was killed is removed by the next write.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    temporary_path(path, int(dead)).write_text("left")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and _leftovers(tmp_path, {"status.json"}) == []
