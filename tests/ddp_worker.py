"""Run by tests/test_scale.py as a subprocess: a two-process ddp_cpu training (Lightning's DDP,
gloo) of a tiny Glow on digits. Each rank writes its parameters after the first optimizer step
(ActNorm's data-dependent init has run on the global batch) and after training, and the summed
count of validation images, so the test can compare the ranks."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import nfcv
from nfcv.training.module import FlowModule


class DumpParams(L.Callback):
    def __init__(self, out: Path):
        self.out = out

    def _dump(self, trainer, module, tag: str) -> None:
        state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
        torch.save(state, self.out / f"{tag}-rank{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            self._dump(trainer, module, "first")

    def on_train_end(self, trainer, module) -> None:
        self._dump(trainer, module, "last")

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            (self.out / f"val-count-rank{trainer.global_rank}.txt").write_text(
                str(int(module._eval_sum[1].item()))
                + " "
                + str(float(trainer.callback_metrics["val/bpd"]))
            )


def main(out: str) -> None:
    out_dir = Path(out)
    cfg = nfcv.compose(
        [
            "trainer=ddp_cpu",
            "model.hidden=8",
            "model.steps=1",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "trainer.enable_progress_bar=false",
            "trainer.num_sanity_val_steps=0",
            "data.batch_size=16",
            "data.val_size=151",  # odd: the ranks get 76 and 75 images, none twice
        ]
    )
    L.seed_everything(0, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.shuffle_seed = 0
    module = FlowModule(OmegaConf.to_container(cfg, resolve=True))
    trainer = instantiate(
        cfg.trainer,
        logger=False,
        enable_checkpointing=False,
        callbacks=[DumpParams(out_dir)],
        default_root_dir=str(out_dir),
    )
    trainer.fit(module, datamodule=datamodule)


if __name__ == "__main__":
    main(sys.argv[1])
