"""One training run: data, model, Trainer, fit, test the best checkpoint, a summary."""

from __future__ import annotations

import logging
import math
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict
from torchvision.utils import save_image

from nfcv.checkpoint import CONFIG, HPARAMS, AtomicCheckpointIO, model_state, read_checkpoint
from nfcv.config import build_model, check_run, resolve, show
from nfcv.data.files import atomic_path
from nfcv.errors import ConfigError, NfcvError
from nfcv.grid import sample_grid
from nfcv.training.callbacks import (
    TrainSpeed,
)
from nfcv.training.lock import hold_run_folder
from nfcv.training.module import FlowModule
from nfcv.training.resume import resume_checkpoint
from nfcv.training.sweep import write_status

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


def run_dir_now() -> Path:
    """Hydra's output folder for this job, else a new timestamped folder under outputs/."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / time.strftime("%Y-%m-%d/%H-%M-%S")


def build(node: DictConfig, **kwargs):
    """`instantiate`, with the `NfcvError` a constructor raised (e.g. a data module refusing
    data.num_bits=9) passed on as itself rather than inside Hydra's `InstantiationException`,
    so the command prints its one-line message."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, NfcvError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise cause from None


def run_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """The callbacks of the config's ``callbacks`` group, in order, skipping null entries."""
    built = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        callback = build(node)
        if not isinstance(callback, L.Callback):
            raise ConfigError(
                f"callbacks.{name} must build a Lightning Callback, got {type(callback).__name__}"
            )
        built.append(callback)
    return built


# Files that do not make a folder hold a run (the lock of `hold_run_folder`).
BOOKKEEPING = (".lock",)


def _holds_nothing(run_dir: Path) -> bool:
    """No file in `run_dir` but bookkeeping: nothing a user would keep."""
    return not any(p.is_file() and p.name not in BOOKKEEPING for p in run_dir.rglob("*"))


def _remove(made: list[Path]) -> None:
    """Remove the run folder this call made (``made[0]``) and the parents it made, those that
    are empty (another run may be in one)."""
    if rank_zero_only.rank != 0:
        return
    try:
        shutil.rmtree(made[0])
        for parent in made[1:]:
            parent.rmdir()
    except OSError:
        pass


def _record_failure(run_dir: Path, err: BaseException) -> None:
    """``status.json`` says the run failed (or was interrupted) and why; the folder is kept."""
    if rank_zero_only.rank != 0:
        return
    status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
    try:
        write_status(run_dir, status, error=err)
    except OSError as cause:
        log.warning("nfcv: could not write the status of the failed run in %s: %s", run_dir, cause)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"flow": [{"a": 1}]}}`` -> ``{"model.flow[0].a": 1}``."""
    if isinstance(node, Mapping):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
    elif isinstance(node, list) and any(isinstance(v, Mapping | list) for v in node):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, key))
    return out


def _short(value: Any) -> str:
    text = show(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_fits(cfg: DictConfig, ckpt_path: str | Path) -> None:
    """Refuse to resume from a checkpoint whose weights do not fit the model the config
    describes (trained with another model.hidden, say), naming the keys that differ, before
    anything is built: Lightning would fail in load_state_dict after the Trainer started."""
    ckpt = read_checkpoint(ckpt_path)
    stored = (ckpt.get(HPARAMS) or {}).get(CONFIG)
    if not isinstance(stored, Mapping):
        return  # no config to compare with: loading the checkpoint reports it
    now = resolve(cfg)
    model_cfg = dict(now["model"])
    if model_cfg.get("conditional") and not model_cfg.get("num_classes"):
        # Set from the data later; the checkpoint's, to build the model now.
        model_cfg["num_classes"] = (stored.get("model") or {}).get("num_classes")
    model = build_model({"model": model_cfg, "dequant": now.get("dequant")})
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model_state(ckpt).items()}
    if want == have:
        return
    groups = ("model", "dequant")
    there = _flatten({g: stored.get(g) for g in groups})
    here = _flatten({g: now.get(g) for g in groups})
    absent = object()
    differ = [
        k
        for k in there.keys() | here.keys()
        if k != "model.num_classes" and there.get(k, absent) != here.get(k, absent)
    ]
    if differ:
        # The shallowest keys: those a user sets (model.hidden), not those that follow from them.
        depth = min(k.count(".") + k.count("[") for k in differ)
        first = sorted(k for k in differ if k.count(".") + k.count("[") == depth)[:3]
        shown = "; ".join(
            f"{k}={_short(there.get(k))} there, {_short(here.get(k))} now" for k in first
        )
        more = f" (and {len(differ) - len(first)} more keys)" if len(differ) > len(first) else ""
        what = f"what differs: {shown}{more}"
    else:
        what = "the configs agree: was it written by another version of nfcv?"
    raise ConfigError(
        f"cannot resume from {ckpt_path}: its weights do not fit the model this config "
        f"describes ({what}). Resume with the settings it was trained with, or train in a new "
        "folder"
    )


def train(
    cfg: DictConfig, run_dir: Path | None = None, callbacks: Sequence[L.Callback] = ()
) -> dict:
    """Fit, then test the best checkpoint (by val bpd).

    `callbacks`: more Lightning callbacks (tests use them to inject faults).

    Returns a summary: test and best val bpd, steps, times, paths, and the `FlowModule` (holding
    the best weights).

    Bad keys or values and a trainer this machine cannot run fail before the run folder is made,
    a checkpoint to resume from that does not fit the model before anything is written in it
    (`ConfigError`s, one line). A run that fails later must not look like a run: a folder made by
    this call that holds nothing yet is removed (with the parents it made), any other is marked
    failed in its ``status.json`` (`nfcv.training.sweep.write_status`).
    """
    # Keys, values and the machine (`check_run`), before anything is made.
    check_run(cfg)
    if run_dir is None:
        run_dir = cfg.get("run_dir") or run_dir_now()
    run_dir = Path(run_dir)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)  # what ${run_dir} in the callbacks and logger configs reads
    made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # One trainer per run folder, for the whole run (a second is refused, naming this one).
        with hold_run_folder(run_dir):
            # Which checkpoint to continue from (resume=auto|true, ckpt_path=), and whether its
            # weights fit the model the config describes: decided before any data is read, so a
            # wrong request fails at once and leaves the folder as it was.
            resume_from = resume_checkpoint(run_dir, cfg.get("resume"), cfg.get("ckpt_path"))
            if resume_from is not None:
                check_resume_fits(cfg, resume_from)
            try:
                return _train(cfg, run_dir, callbacks, resume_from)
            except BaseException as err:
                if not (made and _holds_nothing(run_dir)):
                    _record_failure(run_dir, err)
                raise
    except BaseException:
        if made and _holds_nothing(run_dir):
            _remove(made)
        raise


def paper_setup(cfg: Mapping[str, Any]) -> str | None:
    """The packaged experiment for this preset and dataset (``experiment=glow_cifar10`` for
    ``model=glow data=cifar10``) when the run's model differs from it, else None: the commands
    users type first build the CPU-sized presets, and should say where the paper's sizes are."""
    import importlib.resources

    from omegaconf import OmegaConf

    name = f"{cfg['model'].get('name')}_{cfg['data'].get('name')}"
    path = importlib.resources.files("nfcv.configs").joinpath("experiment", f"{name}.yaml")
    if not path.is_file():
        return None
    pinned = OmegaConf.to_container(OmegaConf.create(path.read_text())).get("model") or {}
    differs = [
        k for k, v in pinned.items() if not isinstance(v, dict) and cfg["model"].get(k) != v
    ]
    return name if differs else None


def what_was_built(cfg: Mapping[str, Any], model: Any, trainer: L.Trainer) -> str:
    """One line before training: preset, its size, dataset, parameters, device and precision
    (and the paper's setup, when the run is not it)."""
    m = cfg["model"]
    keys = ("levels", "steps", "hidden", "patch_size", "blocks", "layers", "width")
    size = ", ".join(f"{k}={m[k]}" for k in keys if k in m)
    params = sum(p.numel() for p in model.parameters())
    shape = "x".join(str(s) for s in cfg["data"].get("image_shape", ()))
    line = (
        f"nfcv: {m.get('name')} ({size}) on {cfg['data'].get('name')} {shape}: {params:,} "
        f"parameters; {trainer.strategy.root_device}, precision {trainer.precision}, "
        f"{trainer.world_size} process(es)"
    )
    paper = paper_setup(cfg)
    if paper is not None:
        line += f". The paper's setup: experiment={paper}"
    return line


def _train(
    cfg: DictConfig, run_dir: Path, callbacks: Sequence[L.Callback], resume_from: str | None
) -> dict:
    _quiet_lightning()
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()

    if cfg.get("resume") == "auto":
        log.info("resume=auto: continuing from %s", resume_from) if resume_from else log.info(
            "resume=auto: no checkpoint in %s, starting", run_dir
        )
    datamodule = build(cfg.data)
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
    logger = build(cfg.logger) if cfg.get("logger") else False
    built = run_callbacks(cfg)
    checkpoint = next(
        (c for c in built if isinstance(c, ModelCheckpoint) and c.monitor is not None), None
    )
    speed = next((c for c in built if isinstance(c, TrainSpeed)), None)
    callbacks = [*built, *callbacks]
    trainer: L.Trainer = build(
        cfg.trainer,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        # Checkpoints go to a temporary file and are renamed over the old one: a process killed
        # while writing last.ckpt leaves the previous one whole.
        plugins=[AtomicCheckpointIO()],
    )
    if trainer.is_global_zero:
        log.info(what_was_built(plain_cfg, module.model, trainer))
    try:
        # weights_only=True: a checkpoint to resume from is read as tensors and plain
        # containers, never unpickled (the same reader as nfcv.load's).
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
        trainer.save_checkpoint(last, weights_only=False)  # the whole state: resumable
    # Read before testing: trainer.test restores the callback state stored in the checkpoint.
    best = (checkpoint.best_model_path if checkpoint is not None else "") or last
    best_score = checkpoint.best_model_score if checkpoint is not None else None
    test_metrics = trainer.test(
        module, datamodule=datamodule, ckpt_path=best, verbose=False, weights_only=True
    )
    test_bpd = float(test_metrics[0]["test/bpd"]) if test_metrics else math.nan

    samples_path = run_dir / "samples.png"
    if trainer.is_global_zero:
        grid = sample_grid(module.eval_model(), cfg.sample.temperatures, cfg.sample.per_row)
        with atomic_path(samples_path) as tmp:
            save_image(grid, tmp)
    summary = {
        "test_bpd": test_bpd,
        "best_val_bpd": float(best_score) if best_score is not None else math.nan,
        "steps": int(trainer.global_step),
        "fit_seconds": round(fit_seconds, 1),
        "train_images_per_second": round(speed.images_per_second, 1) if speed else math.nan,
        "total_seconds": round(time.perf_counter() - start, 1),
        "run_dir": str(run_dir),
        "best_ckpt": best,
        "last_ckpt": last,
        "samples": str(samples_path),
        # What the bpd figures are: with dequant=gaussian the continuous density of the noised
        # images, not a discrete bound (the metric keys stay */bpd for checkpoint selection).
        "figure": module.model.figure(),
        "module": module,
    }
    if trainer.is_global_zero:
        write_status(run_dir, "completed", summary)
        rate = summary["train_images_per_second"]
        # Timed after the first steps only (TrainSpeed's warm-up): a run that short has no figure.
        rate = f"{rate:.0f} training img/s" if math.isfinite(rate) else "too short to time"
        kind = "" if module.model.discrete_bound else "continuous "
        figure = "" if module.model.discrete_bound else f"  figure:      {summary['figure']}\n"
        print(
            f"\nnfcv: {cfg.model.name} on {cfg.data.name}: test {kind}bpd {test_bpd:.4f} "
            f"(best val {kind}bpd {summary['best_val_bpd']:.4f}, {summary['steps']} steps, "
            f"{summary['total_seconds']:.0f} s, {rate})\n"
            f"{figure}"
            f"  run folder:  {run_dir}\n"
            f"  checkpoint:  {best}\n"
            f"  last:        {last}\n"
            f"  samples:     {samples_path}\n"
            f"  tensorboard: tensorboard --logdir {run_dir / 'tb'}\n"
            f"  next:        nfcv-sample ckpt={best}   |   nfcv-eval ckpt={best}"
        )
    return summary
