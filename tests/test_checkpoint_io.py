"""Checkpoint writes are atomic: a writer killed with SIGKILL leaves the previous file loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from nfcv.checkpoint import AtomicCheckpointIO, atomic_torch_save

# A child that rewrites a ~48 MB checkpoint through the plugin in a loop, printing each step
# once its file is in place; every tensor holds its step, so a mixed or torn file shows.
WRITER = """
import sys, torch
from nfcv.checkpoint import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), sys.argv[1]
step = int(sys.argv[2])
while True:
    io.save_checkpoint({"step": step, "w": torch.full((12_000_000,), float(step))}, path)
    print(step, flush=True)
    step += 1
"""


def _check(path) -> int:
    ckpt = torch.load(path, weights_only=True)
    assert bool((ckpt["w"] == ckpt["step"]).all())
    return ckpt["step"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_sigkill_during_writes_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torn_writes, step = 0, 0
    for attempt in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(step)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        first = int(child.stdout.readline())  # one whole write first: the file exists
        if attempt == 0:
            # Once for certain in the middle of a write: as soon as a temporary file appears.
            deadline = time.time() + 60
            while not any(tmp_path.glob(".last.ckpt.tmp-*")) and time.time() < deadline:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.5))  # and at random moments
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        printed = [first, *(int(s) for s in child.stdout.read().split())]
        torn_writes += any(tmp_path.glob(".last.ckpt.tmp-*"))  # killed in the middle of one
        step = _check(path)
        # The file holds the newest completed write (or the one whose rename had just happened).
        assert printed[-1] <= step <= printed[-1] + 1
        step += 1
    assert torn_writes >= 1, "no kill landed in the middle of a write"
    # The next save removes the temporary files of killed writers.
    AtomicCheckpointIO().save_checkpoint({"step": step, "w": torch.full((4,), float(step))}, path)
    assert _check(path) == step and not list(tmp_path.glob(".last.ckpt.tmp-*"))


def test_a_failing_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"step": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot save this")

    with pytest.raises(RuntimeError, match="cannot save this"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_training_writes_through_the_atomic_plugin(tiny_run):
    trainer = tiny_run["module"].trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
