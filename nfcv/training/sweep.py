"""Sweeps: a status file per job, and the table of a whole sweep.

Every `nfcv-train` job writes ``status.json`` into its run folder when it ends: completed (with
its figures), failed (with the error and where its log is) or preempted. Under ``-m`` a failing
job does not stop the others; `SweepReport`, a Hydra callback, prints the table of the sweep when
all jobs have ended and fails the command naming the failed jobs and their logs.
`scripts/summarize_sweep.py` prints the same table for any sweep folder later.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from nfcv.data.files import atomic_write_text

STATUS_FILE = "status.json"
COLUMNS = ("job", "overrides", "status", "best_val_bpd", "test_bpd", "steps", "seconds", "log")


def _log_paths(run_dir: Path) -> list[str]:
    """Where a job's output went: Hydra's job log, and submitit's stdout/stderr when the job runs
    under submitit (local or SLURM)."""
    paths = [str(p) for p in sorted(run_dir.glob("*.log"))]
    if "SUBMITIT_FOLDER" in os.environ or "SUBMITIT_EXECUTOR" in os.environ:
        try:
            import submitit

            env_paths = submitit.JobEnvironment().paths
            paths += [str(env_paths.stderr), str(env_paths.stdout)]
        except Exception:  # not inside a submitit job after all
            pass
    return paths


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def write_status(
    run_dir: str | os.PathLike,
    status: str,
    summary: Mapping[str, Any] | None = None,
    error: BaseException | None = None,
) -> Path:
    """Write ``run_dir/status.json`` (atomically: a reader never sees half a file)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {
        "status": status,
        "overrides": _overrides(run_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "log": _log_paths(run_dir),
    }
    for key in (
        *("test_bpd", "best_val_bpd", "figure"),
        *("steps", "total_seconds", "best_ckpt", "last_ckpt"),
    ):
        if summary and key in summary:
            value = summary[key]
            record[key] = None if isinstance(value, float) and math.isnan(value) else value
    if error is not None:
        record["error"] = f"{type(error).__name__}: {error}"
    return atomic_write_text(run_dir / STATUS_FILE, json.dumps(record, indent=2) + "\n")


def collect(sweep_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per job folder of a sweep (a folder holding ``.hydra/``), in job order.

    A job folder without a status file is reported as ``unfinished`` (still running, or killed
    before it could write one).
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder at {sweep_dir}")
    rows = []
    for hydra_dir in sweep_dir.rglob(".hydra"):
        run_dir = hydra_dir.parent
        status_path = run_dir / STATUS_FILE
        record = json.loads(status_path.read_text()) if status_path.is_file() else {}
        rows.append(
            {
                "job": str(run_dir.relative_to(sweep_dir)),
                "overrides": " ".join(record.get("overrides") or _overrides(run_dir)),
                "status": record.get("status", "unfinished"),
                "best_val_bpd": record.get("best_val_bpd"),
                "test_bpd": record.get("test_bpd"),
                "steps": record.get("steps"),
                "seconds": record.get("total_seconds"),
                "log": (record.get("log") or [""])[-2:][0]
                if record.get("status") == "failed"
                else "",
                "error": record.get("error", ""),
            }
        )

    def order(row: dict[str, Any]):
        return (0, int(row["job"])) if row["job"].isdigit() else (1, row["job"])

    # Show what varies between the jobs: overrides every job shares go to `common`.
    shared = set.intersection(*(set(r["overrides"].split()) for r in rows)) if rows else set()
    for row in rows:
        row["common"] = " ".join(o for o in row["overrides"].split() if o in shared)
        if len(rows) > 1:
            row["overrides"] = " ".join(o for o in row["overrides"].split() if o not in shared)
    return sorted(rows, key=order)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `collect`'s rows."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4f}"
        return str(value)

    table = [list(COLUMNS)] + [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


class SweepReport(Callback):
    """Hydra callback: after a multirun, print the sweep's table, and if any job failed, name
    each with its error and log and exit with status 1 (Hydra turns exceptions raised in
    callbacks into warnings, so this exits instead)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        rows = collect(sweep_dir)
        common = rows[0]["common"] if rows and len(rows) > 1 else ""
        print(
            f"\nnfcv: sweep {sweep_dir} ({len(rows)} jobs"
            + (f"; all with {common}" if common else "")
            + f")\n{format_table(rows)}"
        )
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            details = "\n".join(
                f"  job {r['job']} ({r['overrides']}): {r['status']}"
                + (f": {r['error']}" if r["error"] else "")
                + (f"\n    log: {r['log']}" if r["log"] else "")
                for r in failed
            )
            print(
                f"nfcv: {len(failed)} of {len(rows)} jobs did not complete:\n{details}\n"
                f"The other jobs' results are in {sweep_dir}.",
                file=sys.stderr,
            )
            raise SystemExit(1)
