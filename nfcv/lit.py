"""The Lightning module that trains an `ImageFlow` by maximum likelihood (loss: mean bits/dim)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import grad_norm
from omegaconf import OmegaConf

from nfcv.api import build_model


def linear_warmup(warmup_steps: int):
    """LR factor ramping linearly from 1/warmup_steps to 1 over the first `warmup_steps` steps."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


class FlowModule(L.LightningModule):
    """Wraps `nfcv.build_model(cfg)`; checkpoints carry `cfg` as plain containers.

    `cfg` is the resolved train config (``OmegaConf.to_container(cfg, resolve=True)``), so
    `nfcv.load` rebuilds the model from the checkpoint alone.
    """

    def __init__(self, cfg: dict[str, Any], data_info: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters({"cfg": cfg, "data_info": data_info or {}})
        self.cfg = OmegaConf.create(cfg)
        self.model = build_model(self.cfg)

    def _bpd(self, batch) -> torch.Tensor:
        x, _ = batch
        return self.model.bits_per_dim(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._bpd(batch).mean()
        self.log("train/bpd", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        bpd = self._bpd(batch)
        self.log("val/bpd", bpd.mean(), prog_bar=True, batch_size=bpd.shape[0], sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        bpd = self._bpd(batch)
        self.log("test/bpd", bpd.mean(), batch_size=bpd.shape[0], sync_dist=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Logged before clipping (Lightning clips after this hook): the norm the clip acts on.
        norms = grad_norm(self, norm_type=2)
        if "grad_2.0_norm_total" in norms:
            self.log("train/grad_norm", norms["grad_2.0_norm_total"])

    def configure_optimizers(self):
        optim_cfg = self.cfg.optim
        optimizer = instantiate(optim_cfg.optimizer)(self.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_warmup(int(optim_cfg.get("warmup_steps", 0)))
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
