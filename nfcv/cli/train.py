"""nfcv-train: train a flow by maximum likelihood from the Hydra config tree."""

from __future__ import annotations

import logging
import math
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from nfcv.errors import user_errors
from nfcv.training.run import PREEMPTED_EXIT, run_dir_now, train
from nfcv.training.sweep import write_status

log = logging.getLogger("nfcv")


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
    run_dir = run_dir_now()
    try:
        summary = train(cfg, run_dir=run_dir)
    except (Exception, SystemExit) as err:
        log.exception("nfcv: this job failed")
        write_status(run_dir, "failed", error=err)
        return math.nan
    return summary.get("test_bpd", math.nan)


if __name__ == "__main__":
    main()
