"""nfcv-train: train a flow by maximum likelihood from the Hydra config tree."""

from __future__ import annotations

import logging
import math
import sys
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
    try:
        summary = train(cfg, run_dir=run_dir)
    except (Exception, SystemExit) as err:
        log.exception("nfcv: this job failed")
        write_status(run_dir, "failed", error=err)
        return math.nan
    return summary.get("test_bpd", math.nan)


def main() -> None:
    """nfcv-train."""
    with user_errors():
        check_arguments(sys.argv[1:])
    _main()


if __name__ == "__main__":
    main()
