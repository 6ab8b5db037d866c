"""Soak test: training, evaluation and sampling in parallel processes on one run folder.

    python scripts/soak.py --minutes 30 --out soak/

Starts ``nfcv-train`` on the digits (a small Glow that validates, and so rewrites
``checkpoints/last.ckpt``, every few seconds), and while it runs keeps calling ``nfcv-eval`` and
``nfcv-sample`` on ``last.ckpt`` and reading the file itself. At the end it stops training with
SIGTERM (which saves ``last.ckpt`` and exits 143) and reports: the runs of each command and their
failures, checkpoint reads that failed, the training process's resident memory over time, and
whether the final checkpoint loads. Exit status 1 when anything failed or the memory after
warm-up grew by more than ``--max-growth`` (default 20%).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process and its children (Linux /proc), in MiB."""
    try:
        out = subprocess.run(
            ["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return sum(int(x) for x in out.split()) / 1024 or None
    except (OSError, ValueError):
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path("soak"))
    parser.add_argument("--max-growth", type=float, default=0.2)
    args = parser.parse_args()
    out = args.out.resolve()
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    train_cmd = [
        str(BIN / "nfcv-train"),
        f"hydra.run.dir={run_dir}",
        "resume=auto",
        "model.hidden=16",
        "model.steps=2",
        "trainer.max_steps=100000000",
        "trainer.max_epochs=-1",
        "trainer.val_check_interval=20",
        "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu",
        "sample.every_n_steps=100",
    ]
    train_log = open(out / "train.log", "w")  # noqa: SIM115 - open for the process's life
    trainer = subprocess.Popen(train_cmd, stdout=train_log, stderr=subprocess.STDOUT, env=env)
    last = run_dir / "checkpoints" / "last.ckpt"
    stats = {"eval": [0, 0], "sample": [0, 0], "read": [0, 0]}  # [runs, failures]
    failures: list[str] = []
    memory: list[tuple[float, float]] = []
    start = time.time()
    deadline = start + 60 * args.minutes

    from nfcv.checkpoint import read_checkpoint
    from nfcv.errors import CheckpointError

    while time.time() < deadline and trainer.poll() is None:
        mem = rss_mib(trainer.pid)
        if mem:
            memory.append((round(time.time() - start, 1), round(mem, 1)))
        if not last.is_file():
            time.sleep(1)
            continue
        procs = {
            "eval": subprocess.Popen(
                [
                    str(BIN / "nfcv-eval"),
                    f"ckpt={last}",
                    "split=val",
                    "progress=false",
                    f"out={out / 'eval.json'}",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            ),
            "sample": subprocess.Popen(
                [str(BIN / "nfcv-sample"), f"ckpt={last}", "n=16", f"out={out / 'samples.png'}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            ),
        }
        stats["read"][0] += 1
        try:
            read_checkpoint(last)
        except CheckpointError as err:
            stats["read"][1] += 1
            failures.append(f"read: {err}")
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=600)
            stats[name][0] += 1
            if proc.returncode != 0:
                stats[name][1] += 1
                failures.append(f"{name} exit {proc.returncode}: {err.strip()[-500:]}")
    crashed = trainer.poll() is not None
    if not crashed:
        trainer.send_signal(signal.SIGTERM)
        code = trainer.wait(timeout=600)
        if code != 143:
            failures.append(f"nfcv-train exited {code} on SIGTERM (expected 143)")
    else:
        failures.append(f"nfcv-train stopped by itself with exit {trainer.returncode}")
    train_log.close()
    try:
        ckpt = read_checkpoint(last)
        steps = int(ckpt.get("global_step", -1))
    except CheckpointError as err:
        failures.append(f"final last.ckpt: {err}")
        steps = -1
    warm = [m for t, m in memory if t >= 0.2 * (memory[-1][0] if memory else 0)]
    growth = (warm[-1] - warm[0]) / warm[0] if len(warm) >= 2 else 0.0
    if growth > args.max_growth:
        failures.append(f"training memory grew {100 * growth:.0f}% after warm-up")
    report = {
        "minutes": round((time.time() - start) / 60, 1),
        "steps": steps,
        "runs_and_failures": stats,
        "train_rss_mib": {
            "first": memory[0][1] if memory else None,
            "after_warmup": warm[0] if warm else None,
            "last": memory[-1][1] if memory else None,
            "max": max(m for _, m in memory) if memory else None,
            "growth_after_warmup": round(growth, 3),
        },
        "failures": failures,
    }
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
