"""Run folders written by nfcv-train: finding their checkpoints and naming them.

A run folder holds ``checkpoints/best-step*.ckpt`` and ``checkpoints/last.ckpt``, ``tb/`` and,
when Hydra ran it, ``.hydra/overrides.yaml`` (the command-line overrides); a sweep folder
(``outputs/multirun/DATE/TIME``) holds one run folder per job.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nfcv.errors import CheckpointError


def _step(path: Path) -> int:
    match = re.search(r"(\d+)", path.stem)
    return int(match.group(1)) if match else -1


def run_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The checkpoint a run folder stands for: its best (``checkpoints/best-step*.ckpt``, the
    highest step if there are several), else ``checkpoints/last.ckpt``."""
    folder = Path(run_dir) / "checkpoints"
    best = sorted(folder.glob("best*.ckpt"), key=_step)
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise CheckpointError(f"no checkpoint in {folder} (expected best-step*.ckpt or last.ckpt)")


def is_run_dir(path: Path) -> bool:
    return (path / "checkpoints").is_dir()


def expand_checkpoints(value: str | os.PathLike) -> list[Path]:
    """A checkpoint file, a run folder (its `run_checkpoint`) or a sweep folder (each run's,
    in job order) -> checkpoint paths."""
    path = Path(value).expanduser()
    if path.is_file() or not path.exists():
        return [path]  # a missing file is reported by the loader, with its own message
    if is_run_dir(path):
        return [run_checkpoint(path)]
    runs = sorted((p for p in path.iterdir() if is_run_dir(p)), key=lambda p: (_step(p), p.name))
    if not runs:
        raise CheckpointError(
            f"{path} is a folder without checkpoints: pass a checkpoint file, a run folder "
            "(holding checkpoints/) or a sweep folder (holding run folders)"
        )
    return [run_checkpoint(run) for run in runs]


def run_dir_of(ckpt: str | os.PathLike) -> Path:
    """The run folder of a checkpoint (the parent of ``checkpoints/``), else its folder."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run_label(run_dir: str | os.PathLike) -> str:
    """The run's Hydra overrides (``.hydra/overrides.yaml``) joined by spaces, or, without any,
    the folder name."""
    run_dir = Path(run_dir)
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        from omegaconf import OmegaConf

        items = OmegaConf.load(overrides)
        if items:
            return " ".join(str(item) for item in items)
    return run_dir.name or str(run_dir)
