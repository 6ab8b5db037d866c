"""nfcv-train: train a flow by maximum likelihood from the Hydra config tree."""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict
from torchvision.utils import save_image

from nfcv.allocator import keep_freed_memory
from nfcv.api import resolve
from nfcv.callbacks import ReconstructionLogger, SampleGridLogger, TrainSpeed, ValBpdHistogram
from nfcv.checkpoint_io import AtomicCheckpointIO
from nfcv.errors import ConfigError, user_errors
from nfcv.grid import sample_grid
from nfcv.guard import NumericalGuard
from nfcv.lit import FlowModule
from nfcv.resume import LAST, Preemption, ResumeState, resume_checkpoint
from nfcv.schema import check_keys
from nfcv.sweep import write_status

log = logging.getLogger("nfcv")
# Exit status of a run stopped by SIGTERM after saving last.ckpt (128 + SIGTERM, the shell's
# convention): not a success, so schedulers requeue it and scripts do not go on.
PREEMPTED_EXIT = 143


def _quiet_lightning() -> None:
    """Drop Lightning's advertising tips and a deprecation warning it raises against itself."""

    class _NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Tip:" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def _run_dir() -> Path:
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def _guard(cfg: DictConfig, last: Path) -> list[NumericalGuard]:
    """The numerical guard of the ``guard:`` block (absent in older configs: the defaults)."""
    guard = cfg.get("guard") or {}
    if not guard.get("enabled", True):
        return []
    precision = str(cfg.trainer.get("precision", "32"))
    return [
        NumericalGuard(
            last,
            max_bad_steps=int(guard.get("max_bad_steps", 5)),
            lr_factor=float(guard.get("lr_factor", 0.5)),
            max_rollbacks=int(guard.get("max_rollbacks", 3)),
            # float16's GradScaler skips its own overflowing steps: not a divergence.
            check_grads=not precision.startswith("16"),
        )
    ]


def train(
    cfg: DictConfig, run_dir: Path | None = None, callbacks: Sequence[L.Callback] = ()
) -> dict:
    """Fit, then test the best checkpoint (by val bpd).

    `callbacks`: more Lightning callbacks (tests use them to inject faults).

    With ``keep_freed_memory: true`` (the default) this sets glibc's malloc for the rest of the
    process (`nfcv.allocator.keep_freed_memory`), also when called from Python.

    Returns a summary: test and best val bpd, steps, times, paths, and the `FlowModule` (holding
    the best weights).
    """
    check_keys(cfg)  # a key added with `+` that its group does not have: before anything runs
    keep = cfg.get("keep_freed_memory", True)
    if not isinstance(keep, bool):
        raise ConfigError(
            f"keep_freed_memory must be true or false, got {keep!r}: pass keep_freed_memory=true "
            "(reuse freed memory, the default) or keep_freed_memory=false"
        )
    if keep:
        keep_freed_memory()
    run_dir = Path(run_dir) if run_dir is not None else _run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    _quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()

    # Which checkpoint to continue from (resume=auto|true, ckpt_path=): decided before any data
    # is read, so a wrong request fails at once.
    resume_from = resume_checkpoint(run_dir, cfg.get("resume"), cfg.get("ckpt_path"))
    if cfg.get("resume") == "auto":
        log.info("resume=auto: continuing from %s", resume_from) if resume_from else log.info(
            "resume=auto: no checkpoint in %s, starting", run_dir
        )
    datamodule = instantiate(cfg.data)
    datamodule.shuffle_seed = int(cfg.seed)  # the training order: from (seed, epoch)
    datamodule.setup("fit")  # fail on missing or mismatched data before building anything else
    # The test split too: its files are checked before training rather than after it, and the
    # checkpoint's data record gives the size of every split.
    datamodule.setup("test")
    if cfg.model.get("conditional", False):
        classes = getattr(datamodule, "num_classes", None)
        if not classes:
            raise ConfigError(
                f"model.conditional=true needs labels, and data {cfg.data.name} has none: use a "
                "labelled dataset or model.conditional=false"
            )
        with open_dict(cfg):
            cfg.model.num_classes = int(classes)
    plain_cfg = resolve(cfg)
    module = FlowModule(plain_cfg, data_info=datamodule.describe())

    ckpt_dir = run_dir / "checkpoints"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-step{step}",
        auto_insert_metric_name=False,
        monitor="val/bpd",
        mode="min",
    )
    # last.ckpt: the latest state, rewritten at every validation. Not save_last=True above:
    # Lightning >= 2.5 rewrites that file only when the best improves, so it held the best
    # state, and resuming from it went back in time.
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    logger = TensorBoardLogger(
        save_dir=str(run_dir), name="tb", version="", default_hp_metric=False
    )
    speed = TrainSpeed()
    extra_callbacks = list(callbacks)
    callbacks = [
        checkpoint,
        latest,
        speed,
        LearningRateMonitor(logging_interval="step"),
        SampleGridLogger(cfg.sample.every_n_steps, cfg.sample.temperatures, cfg.sample.per_row),
        ReconstructionLogger(
            cfg.sample.every_n_steps, cfg.sample.get("reconstructions", 8), cfg.sample.per_row
        ),
        ValBpdHistogram(),
        ResumeState(),
        Preemption(ckpt_dir),
        *_guard(cfg, ckpt_dir / LAST),
        *extra_callbacks,
    ]
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        # Checkpoints go to a temporary file and are renamed over the old one: a process killed
        # while writing last.ckpt leaves the previous one whole.
        plugins=[AtomicCheckpointIO()],
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:
        # Preemption saved last.ckpt at the end of the batch in progress (on_exception).
        summary = {
            "preempted": True,
            "steps": int(trainer.global_step),
            "run_dir": str(run_dir),
            "last_ckpt": str(ckpt_dir / "last.ckpt"),
            "total_seconds": round(time.perf_counter() - start, 1),
        }
        if trainer.is_global_zero:
            write_status(run_dir, "preempted", summary)
            print(
                f"\nnfcv: stopped by SIGTERM at step {summary['steps']}; saved "
                f"{summary['last_ckpt']}\n  continue: the same command with resume=auto "
                f"hydra.run.dir={run_dir}"
            )
        return summary
    fit_seconds = time.perf_counter() - start

    # The steps after the last validation too (max_steps not a multiple of the interval).
    last = str(ckpt_dir / "last.ckpt")
    if trainer.global_step > 0:
        trainer.save_checkpoint(last, weights_only=False)  # the full state: resumable
    # Read before testing: trainer.test restores the callback state stored in the checkpoint.
    best = checkpoint.best_model_path or last
    best_score = checkpoint.best_model_score
    # weights_only=True: the checkpoint is read as tensors and plain containers, never unpickled.
    test_metrics = trainer.test(
        module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
    )
    test_bpd = float(test_metrics[0]["test/bpd"]) if test_metrics else math.nan

    samples_path = run_dir / "samples.png"
    if trainer.is_global_zero:
        grid = sample_grid(module.eval_model(), cfg.sample.temperatures, cfg.sample.per_row)
        save_image(grid, samples_path)
    summary = {
        "test_bpd": test_bpd,
        "best_val_bpd": float(best_score) if best_score is not None else math.nan,
        "steps": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 1),
        "train_images_per_second": round(speed.images_per_second, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "run_dir": str(run_dir),
        "best_ckpt": best,
        "last_ckpt": last,
        "samples": str(samples_path),
        "module": module,
    }
    if trainer.is_global_zero:
        write_status(run_dir, "completed", summary)
        print(
            f"\nnfcv: {cfg.model.name} on {cfg.data.name}: test bpd {test_bpd:.4f} "
            f"(best val bpd {summary['best_val_bpd']:.4f}, {summary['steps']} steps, "
            f"{summary['total_seconds']:.0f} s, {summary['train_images_per_second']:.0f} "
            "training img/s)\n"
            f"  run folder:  {run_dir}\n"
            f"  checkpoint:  {best}\n"
            f"  last:        {last}\n"
            f"  samples:     {samples_path}\n"
            f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}\n"
            f"  next:        nfcv-sample ckpt={best}   |   nfcv-eval ckpt={best}"
        )
    return summary


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    if not _in_multirun():
        with user_errors():
            summary = train(cfg)
        if summary.get("preempted"):
            sys.exit(PREEMPTED_EXIT)
        return summary["test_bpd"]
    # In a sweep one failing job must not stop the others: record the failure in the job's
    # status.json (with its log) and return; the sweep's report names the failed jobs at the end.
    run_dir = _run_dir()
    try:
        summary = train(cfg, run_dir=run_dir)
    except (Exception, SystemExit) as err:
        log.exception("nfcv: this job failed")
        write_status(run_dir, "failed", error=err)
        return math.nan
    return summary.get("test_bpd", math.nan)


if __name__ == "__main__":
    main()
