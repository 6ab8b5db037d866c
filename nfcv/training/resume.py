"""Exact resume and preemption.

A run resumed from a checkpoint replays the uninterrupted run exactly (on CPU, same seed), at an
epoch boundary or in the middle of an epoch, because everything random is either in the
checkpoint or derived from it:

- model, optimizer, scheduler (warmup position), EMA, step and epoch counters: Lightning and
  `FlowModule` save and restore them;
- the training order: `ResumableShuffle` draws each epoch's permutation from (seed, epoch) with
  its own generator; `ResumeState` saves its position and skips the batches already done when
  a run resumes mid-epoch;
- the global RNG streams (dequantization noise, dropout): `ResumeState` saves them with every
  checkpoint and restores them right before the first batch after a resume.

`Preemption` saves ``last.ckpt`` when SIGTERM arrives, at the end
of the batch in progress; ``nfcv-train ... resume=auto`` continues from it.
"""

from __future__ import annotations

import logging
import os
import random
import time
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nfcv.data.samplers import ResumableShuffle
from nfcv.errors import CheckpointError, ConfigError
from nfcv.training.lock import is_rank_zero

log = logging.getLogger("nfcv")

# Checked in this order by `resume=auto`: our own checkpoints, then Lightning's SLURM
# auto-requeue ones (hpc_ckpt_N.ckpt in the run folder).
LAST = "last.ckpt"



def _capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["keys"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeState(L.Callback):
    """Saves with every checkpoint the global RNG states and where the training order stands
    (epoch of the sampler, batches done in it); after a resume, puts the sampler there and
    restores the RNG states right before the first training batch (after the sanity check and
    the data loader's start, which would otherwise consume them)."""

    def __init__(self):
        self._pending: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @staticmethod
    def _train_loader(trainer: L.Trainer | None):
        try:
            loader = trainer.train_dataloader if trainer is not None else None
        except Exception:  # no fit loop (testing)
            return None, None
        sampler = getattr(loader, "sampler", None)
        return (loader, sampler) if isinstance(sampler, ResumableShuffle) else (None, None)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": _capture_rng()}
        loader, sampler = self._train_loader(self._trainer)
        if sampler is not None:
            state["order"] = {
                "epoch": sampler.epoch,
                "done": int(self._trainer.fit_loop.epoch_loop.batch_progress.current.completed),
                "per_epoch": len(loader),
            }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None or "order" not in self._pending:
            return
        loader, sampler = self._train_loader(trainer)
        order = self._pending["order"]
        if sampler is None or order["per_epoch"] != len(loader):
            return  # another data size or batch size: the order cannot be replayed
        if order["done"] >= order["per_epoch"]:
            sampler.resume_at(order["epoch"] + 1)
        else:
            sampler.resume_at(order["epoch"], order["done"] * loader.batch_size)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            _restore_rng(self._pending["rng"])
            self._pending = None


class Preemption(L.Callback):
    """On SIGTERM Lightning stops at the end of the batch in progress and raises
    `SIGTERMException`; this saves ``last.ckpt`` then, so the requeued job continues from here
    with ``resume=auto``. (SLURM's pre-timeout signals are left to submitit and to Lightning's
    SLURM requeue, whose ``hpc_ckpt_*.ckpt`` `resume_checkpoint` also finds.)"""

    def __init__(self, ckpt_dir: Path):
        self.ckpt_dir = Path(ckpt_dir)

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(self.ckpt_dir / LAST, weights_only=False)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from (None if it looks whole): empty, truncated (its zip
    directory, at the end of the file, is missing) or damaged (a member fails its CRC). Reads
    the file once, without unpickling it (Lightning loads it next, from the page cache)."""
    try:
        if path.stat().st_size == 0:
            return "empty"
        with zipfile.ZipFile(path) as zf:
            if not any(n.endswith("data.pkl") for n in zf.namelist()):
                return "not a PyTorch checkpoint (no data.pkl)"
            bad = zf.testzip()
    except zipfile.BadZipFile:
        return "truncated or not a PyTorch checkpoint (no zip directory at its end)"
    except (OSError, EOFError, ValueError, RuntimeError) as err:
        return f"unreadable ({type(err).__name__}: {err})"
    return f"damaged (member {bad} fails its CRC)" if bad is not None else None


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint that cannot be read to ``NAME.corrupt-<time>`` beside it: kept for
    inspection, out of the way of the next save (which would replace it) and of ``*.ckpt``."""
    aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{n}")
        n += 1
    os.replace(path, aside)
    return aside


def _by_mtime(paths: Any) -> list[Path]:
    return sorted((p for p in paths if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


def _newest_good(run_dir: Path, request: str) -> str:
    """The newest checkpoint of `run_dir` that can be read: ``last.ckpt`` and Lightning's
    ``hpc_ckpt_*.ckpt`` by modification time, then the other checkpoints of the folder
    (``best-step*.ckpt``). Those that cannot be read and are newer than it are renamed aside
    (`_set_aside`), said in the log; none readable: a `CheckpointError` naming each, nothing
    moved."""
    ckpts = run_dir / "checkpoints"
    first = _by_mtime([ckpts / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")])
    others = _by_mtime(p for p in ckpts.glob("*.ckpt") if p not in first)
    bad: list[tuple[Path, str]] = []
    for path in [*first, *others]:
        problem = checkpoint_problem(path)
        if problem is None:
            break
        bad.append((path, problem))
    else:
        listed = "; ".join(f"{p} ({why})" for p, why in bad)
        raise CheckpointError(
            f"{request}: no readable checkpoint in {run_dir}: {listed}. Nothing was moved. To "
            "start this run again from scratch, move these files away (or train in another "
            "folder); to continue from another file, pass ckpt_path=PATH"
        )
    for damaged, problem in bad:
        aside = _set_aside(damaged) if is_rank_zero() else damaged  # other ranks: rank 0 does
        log.warning(
            "nfcv: %s: %s cannot be read: %s; moved it aside to %s (kept, not deleted) and "
            "continuing from %s, the newest checkpoint that can be read",
            request,
            damaged,
            problem,
            aside,
            path,
        )
    return str(path)


def resume_checkpoint(run_dir: Path, resume: Any, ckpt_path: Any) -> str | None:
    """The checkpoint `nfcv-train` continues from, or None for a fresh run.

    - ``ckpt_path=PATH``: that file (a `CheckpointError` if it cannot be read). ``ckpt_path=last``
      (or ``resume=true``): this run folder's newest checkpoint, an error if it has none.
    - ``resume=auto``: the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM
      ``hpc_ckpt_*.ckpt`` if there is one, else a fresh start (said in the log): what a job that
      may be requeued should pass.

    A newest checkpoint that cannot be read (truncated, empty: a copy cut short, a full disk) is
    renamed aside to ``NAME.corrupt-<time>`` and the run continues from the newest one that can
    be, ``best-step*.ckpt`` included, said in the log (`_newest_good`). A folder named
    ``checkpoints/last.ckpt`` is refused before anything runs: the first save would fail on it.
    """
    if resume not in (None, False, True, "auto"):
        raise ConfigError(f"resume must be auto, true or false, got {resume!r}")
    last = run_dir / "checkpoints" / LAST
    if last.exists() and not last.is_file():
        raise ConfigError(
            f"{last} is a folder, not a checkpoint file: nfcv-train saves its latest state "
            "there and would fail after training. Remove or rename it (or train in another "
            "folder)"
        )
    candidates = [last, *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if ckpt_path not in (None, "last"):
        path = Path(str(ckpt_path))
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"ckpt_path={ckpt_path}: cannot resume from {path}: {problem}")
        return str(path)
    if ckpt_path == "last" or resume is True:
        if not existing:
            raise ConfigError(
                f"nothing to resume: {last} does not exist. Pass the "
                "run folder of the run to continue (hydra.run.dir=...), or resume=auto to start "
                "fresh when there is no checkpoint"
            )
        return _newest_good(run_dir, "ckpt_path=last" if ckpt_path == "last" else "resume=true")
    if resume == "auto":
        return _newest_good(run_dir, "resume=auto") if existing else None
    if existing:
        newest = max(existing, key=lambda p: p.stat().st_mtime)
        raise ConfigError(
            f"{run_dir} already holds a run ({newest.name}); continue it with resume=auto "
            "(or ckpt_path=last), or choose a new folder"
        )
    return None
