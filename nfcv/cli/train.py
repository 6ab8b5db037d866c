"""nfcv-train: train a flow by maximum likelihood from the Hydra config tree."""

from __future__ import annotations

import logging
import math
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from nfcv.config import check_overrides, check_run, check_values
from nfcv.errors import user_errors
from nfcv.schema import check_keys
from nfcv.training.run import PREEMPTED_EXIT, run_dir_now, train
from nfcv.training.sweep import write_status

log = logging.getLogger("nfcv")


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_arguments(argv: Sequence[str]) -> None:
    """What Hydra would fail on with a traceback before it reads the config: a launcher whose
    plugin is missing (``hydra/launcher=slurm`` without the `cluster` extra)."""
    check_overrides(a for a in argv if not a.startswith("-"))


class CheckConfig(Callback):
    """Hydra callback (configs/train.yaml): the composed config's keys and values, and for a
    single run the machine (`nfcv.config.check_run`), checked before Hydra makes the run or
    sweep folder; a problem is one line on stderr and exit status 2. (Hydra turns exceptions in
    callbacks into warnings: `user_errors` exits instead.) A sweep checks the machine in each
    job, which may run elsewhere (SLURM)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            check_run(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with user_errors():
            check_keys(config)
            check_values(config)


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="train")
def _main(cfg: DictConfig) -> float:
    if not _in_multirun():
        with user_errors():
            summary = train(cfg)
        if summary.get("preempted"):
            sys.exit(PREEMPTED_EXIT)
        return summary["test_bpd"]
    # In a sweep one failing job must not stop the others: record the failure in the job's
    # status.json (with its log) and return; the sweep's report names the failed jobs at the end.
    run_dir = run_dir_now()
    if cfg.get("resume") is None:
        # A job's folder is its own (hydra.sweep.subdir), and SLURM may requeue the job into it
        # after a timeout or preemption: it continues from last.ckpt there instead of refusing a
        # folder that holds a run. An explicit resume=... is kept.
        cfg.resume = "auto"
    try:
        summary = train(cfg, run_dir=run_dir)
    except (Exception, SystemExit) as err:
        log.exception("nfcv: this job failed")
        write_status(run_dir, "failed", error=err)
        return math.nan
    return summary.get("test_bpd", math.nan)


# The groups a user picks with GROUP=OPTION, in the order of train.yaml's defaults (the rest of
# the tree, layer/ and the typed schemas, is what these are built from).
USER_GROUPS = (
    ("model", "the flow"),
    ("data", "the dataset"),
    ("dequant", "dequantization"),
    ("optim", "optimizer and schedule"),
    ("trainer", "Lightning Trainer: device, steps, precision, DDP"),
    ("callbacks", "the run's callbacks (checkpoints, grids, guard...)"),
    ("logger", "the run's logger"),
    ("experiment", "a paper's or a benchmark's settings (none by default)"),
    ("hydra/launcher", "where the jobs of -m run (the cluster extra)"),
)


def help_text() -> str:
    """``nfcv-train --help``: usage and the options of each group, read from the packaged
    configs so the list is always the installed one."""
    import importlib.resources

    root = importlib.resources.files("nfcv.configs")
    lines = [
        "nfcv-train: train a normalizing flow on images by maximum likelihood, then test the",
        "checkpoint with the best validation bits per dim.",
        "",
        "usage: nfcv-train [GROUP=OPTION ...] [KEY=VALUE ...]",
        "       nfcv-train -m [GROUP=A,B ...] [KEY=V1,V2 ...]   a sweep: a job per combination",
        "",
        "  nfcv-train                                       Glow on the embedded 8x8 digits",
        "  nfcv-train model=glow data=cifar10 trainer=gpu",
        "  nfcv-train experiment=glow_cifar10 trainer=gpu   the paper's setup",
        "  nfcv-train hydra.run.dir=RUN resume=auto         continue run RUN",
        "",
        "groups (GROUP=OPTION):",
    ]
    for group, what in USER_GROUPS:
        folder = root.joinpath(*group.split("/"))
        options = sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))
        lines.append(f"  {group:<15} {what}")
        lines += textwrap.wrap(
            ", ".join(options), 99, initial_indent=" " * 20, subsequent_indent=" " * 20
        )
    lines += [
        "",
        "keys: any key of the composed config, e.g. model.hidden=64 optim.optimizer.lr=3e-4",
        "      trainer.max_steps=10000 seed=1 (nfcv-train --cfg job prints them all)",
        "then: nfcv-sample ckpt=RUN, nfcv-eval ckpt=RUN, nfcv-export ckpt=RUN",
        "Hydra's own options: nfcv-train --hydra-help",
    ]
    return "\n".join(lines)


def main() -> None:
    """nfcv-train."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print(help_text())
        return
    with user_errors():
        check_arguments(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
