"""Training curves of one or more nfcv runs in one PNG: train and val bits per dim against
optimizer step (left) and against wall-clock minutes since the run's logger started (right).

    python scripts/plot_runs.py outputs/2026-01-01/12-00-00 outputs/multirun/.../0 --out bpd.png

Each RUN is a run folder of nfcv-train (its TensorBoard events under ``tb/``; any folder holding
event files works). Runs are labelled by their Hydra overrides (``.hydra/overrides.yaml``), else
by the folder name. Train values are drawn solid, val dashed, one colour per run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed (clusters, CI)
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

from nfcv.training.runs import run_label  # noqa: E402

TAGS = ("train/bpd", "val/bpd")


@dataclass
class Series:
    steps: list[int] = field(default_factory=list)
    wall_time: list[float] = field(default_factory=list)  # seconds since the epoch
    values: list[float] = field(default_factory=list)


@dataclass
class Run:
    path: Path
    label: str
    series: dict[str, Series]  # tag -> values
    start: float  # wall time of the first event (the logger's creation, near the run's start)


def _event_dirs(run: Path) -> list[Path]:
    """Folders holding event files: ``tb/`` of a run folder, else any under `run`."""
    files = sorted((run / "tb").rglob("events.out.tfevents.*")) if (run / "tb").is_dir() else []
    files = files or sorted(run.rglob("events.out.tfevents.*"))
    return sorted({f.parent for f in files})


def load_run(run: str | Path, tags: Sequence[str] = TAGS) -> Run:
    """The scalars `tags` of a run's TensorBoard logs (every value: no subsampling). A resumed
    run appends event files to the same folder; they are read together, in step order."""
    run = Path(run)
    dirs = _event_dirs(run)
    if not dirs:
        raise SystemExit(f"plot_runs: no TensorBoard event files under {run}")
    series = {tag: Series() for tag in tags}
    starts = []
    for folder in dirs:
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        starts.append(acc.FirstEventTimestamp())
        available = set(acc.Tags().get("scalars", []))
        for tag in tags:
            if tag in available:
                for event in acc.Scalars(tag):
                    s = series[tag]
                    s.steps.append(int(event.step))
                    s.wall_time.append(float(event.wall_time))
                    s.values.append(float(event.value))
    for s in series.values():
        order = sorted(range(len(s.steps)), key=lambda i: (s.steps[i], s.wall_time[i]))
        s.steps = [s.steps[i] for i in order]
        s.wall_time = [s.wall_time[i] for i in order]
        s.values = [s.values[i] for i in order]
    return Run(path=run, label=run_label(run), series=series, start=min(starts))


def plot_runs(runs: Sequence[Run], out: str | Path, title: str | None = None):
    """Draw `runs` into `out` (PNG); returns the matplotlib figure."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        for tag, s in run.series.items():
            if not s.values:
                continue
            style = "-" if tag.startswith("train") else "--"
            label = f"{run.label} ({tag.split('/')[0]})"
            minutes = [(t - run.start) / 60 for t in s.wall_time]
            marker = "o" if len(s.values) < 3 else None  # a point or two would be invisible
            by_step.plot(s.steps, s.values, style, color=colour, label=label, marker=marker)
            by_time.plot(minutes, s.values, style, color=colour, label=label, marker=marker)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock minutes")
    by_step.set_ylabel("bits per dim")
    for ax in (by_step, by_time):
        ax.grid(True, alpha=0.3)
    by_time.legend(fontsize="small", loc="upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of nfcv-train")
    parser.add_argument("--out", type=Path, default=Path("runs_bpd.png"), help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = [load_run(run) for run in args.runs]
    empty = [str(r.path) for r in runs if not any(s.values for s in r.series.values())]
    if len(empty) == len(runs):
        raise SystemExit(f"plot_runs: none of the runs logged {' or '.join(TAGS)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, args.out, title=args.title)
    for path in empty:
        print(f"plot_runs: {path} logged neither {' nor '.join(TAGS)}", file=sys.stderr)
    print(f"plot_runs: {len(runs)} run(s) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
