"""The Lightning module that trains an `ImageFlow` by maximum likelihood (loss: mean bits/dim)."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from nfcv.checkpoint import hparams
from nfcv.config import build_model
from nfcv.errors import ConfigError
from nfcv.model import ImageFlow
from nfcv.registry import build, resolved
from nfcv.training.ema import EMA


def lr_factor(warmup_steps: int, decay: str = "none", total_steps: int = 0):
    """LR multiplier at each optimizer step: a linear ramp from 1/warmup_steps to 1 over the first
    `warmup_steps` steps, then constant (`decay="none"`) or a cosine to 0 at `total_steps`."""
    if decay not in ("none", "cosine"):
        raise ConfigError(f"optim.decay must be none or cosine, got {decay!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "cosine":
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_optimizer(optimizer_cfg, params, allow_fused: bool = True) -> torch.optim.Optimizer:
    """The config's optimizer over `params`. Where the class has a fused implementation (Adam,
    AdamW, SGD), `allow_fused` and the config does not choose, it is used: one kernel per step
    instead of a loop over the parameters (Adam's step on the paper-size Glow: 33 ms -> 12 ms on
    a CPU, the same update up to rounding). ``optim.optimizer.fused=false`` keeps the loop.
    Lightning's mixed precision refuses gradient clipping with a fused optimizer (it unscales
    inside its step), so FlowModule passes ``allow_fused=False`` under ``*-mixed``."""
    params = list(params)
    factory = build(resolved(optimizer_cfg), where="optim.optimizer")
    cls = factory.func if isinstance(factory, functools.partial) else factory
    kwargs = {}
    if (
        allow_fused
        and "fused" in inspect.signature(cls).parameters
        and "fused" not in optimizer_cfg
        and params
        and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    ):
        kwargs["fused"] = True
    return factory(params, **kwargs)


class FlowModule(L.LightningModule):
    """Wraps `nfcv.build_model(cfg)`; checkpoints carry `cfg` as plain containers.

    `cfg` is the resolved train config (``OmegaConf.to_container(cfg, resolve=True)``), so
    `nfcv.load` rebuilds the model from the checkpoint alone.

    With ``ema.decay`` set, an `EMA` of the weights is updated after every optimizer step, saved
    in checkpoints and restored on resume; validation, test, the sample grids and samples.png use
    it (`eval_model`), as nfcv-eval and nfcv-sample do by default.
    """

    def __init__(self, cfg: dict[str, Any], data_info: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters(hparams(cfg, data_info))
        self.cfg = OmegaConf.create(cfg)
        self.model = build_model(self.cfg)
        # compile=true: the whole training forward (dequantization, flow, prior, bits per dim)
        # as one torch.compile graph, from the second step on (the first runs eagerly: the
        # data-dependent initialisations and the input checks). The model's modules and
        # parameter names stay as they are, so checkpoints do not depend on it.
        self._compiled_bpd = torch.compile(self._train_bpd) if self.cfg.get("compile") else None
        decay = (self.cfg.get("ema") or {}).get("decay")
        self.ema = EMA(decay, lambda: build_model(self.cfg)) if decay is not None else None

    def eval_model(self) -> ImageFlow:
        """The weights to evaluate and sample: the EMA once it exists, else the trained ones."""
        averaged = self.ema.averaged(self.model) if self.ema is not None else None
        return averaged if averaged is not None else self.model

    def _bpd(self, batch, check: bool = True, model: ImageFlow | None = None) -> torch.Tensor:
        x, labels = batch
        model = model if model is not None else self.model
        labels = labels if model.num_classes else None  # p(x | y) for class-conditional models
        return model.bits_per_dim(x, check=check, labels=labels)

    def _train_bpd(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.model.bits_per_dim(x, check=False, labels=labels).mean()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        # The data module validated every pixel at setup; re-check the first batch only (the range
        # check costs a device sync per step).
        if self._compiled_bpd is not None and self.global_step > 0:
            x, labels = batch
            loss = self._compiled_bpd(x, labels if self.model.num_classes else None)
        else:
            loss = self._bpd(batch, check=self.global_step == 0).mean()
        if self._logs_this_step():
            # Copied to the host here, on logging steps only: Lightning converts progress-bar
            # values to numbers at every step, which for a GPU tensor is a sync per step.
            self.log(
                "train/bpd",
                loss.detach().to("cpu", copy=True),
                prog_bar=True,
                batch_size=len(batch[0]),
            )
        return loss

    def _logs_this_step(self) -> bool:
        """Whether this training step's metrics reach the loggers: the first step and every
        ``trainer.log_every_n_steps``-th (Lightning writes logs when the count of optimizer steps
        taken, this one included, is a multiple of it). Metrics logged on other steps would go
        nowhere but the progress bar, and Lightning reads progress-bar values on the host: one
        device-to-host copy per metric per step, which stalls a GPU's queue."""
        trainer = self._trainer
        every = trainer.log_every_n_steps if trainer is not None else 1
        return every > 0 and (self.global_step == 0 or (self.global_step + 1) % every == 0)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after each optimizer step (also under gradient accumulation), before any
        # callback's on_train_batch_end looks at the weights.
        if self.ema is not None:
            self.ema.update(self.model)

    # Validation and test: each rank sums the bits per dim of its share of the split (the
    # samplers give every image to exactly one rank, without padding), the sums and counts are
    # all-reduced at the end, and the figure logged is the mean over the whole split: the same
    # number one process gets. The dequantization noise comes from a generator seeded by
    # `seed` (so the figure does not depend on when in training it is measured) and the
    # training RNG streams are put back afterwards (so validating does not change training).

    def _start_eval(self) -> None:
        self._rng_saved = torch.get_rng_state()
        self._cuda_rng_saved = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        )
        torch.manual_seed(int(self.cfg.get("seed", 0)) + 7919 * self.global_rank)
        self._eval_sum = torch.zeros(2, dtype=torch.float64, device=self.device)

    def _end_eval(self, name: str, prog_bar: bool) -> None:
        torch.set_rng_state(self._rng_saved)
        if self._cuda_rng_saved is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng_saved)
        total = self._eval_sum
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total.clone(), reduce_op="sum")
        if total[1] > 0:
            self.log(name, (total[0] / total[1]).float(), prog_bar=prog_bar, sync_dist=False)

    def _accumulate(self, bpd: torch.Tensor) -> None:
        self._eval_sum += torch.stack([bpd.double().sum(), bpd.new_tensor(bpd.numel()).double()])

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        bpd = self._bpd(batch, model=self.eval_model())
        self._accumulate(bpd)
        return bpd.detach()  # per-image values, for callbacks (the val bpd histogram)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val/bpd", prog_bar=True)

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch, batch_idx: int) -> None:
        self._accumulate(self._bpd(batch, model=self.eval_model()))

    def on_test_epoch_end(self) -> None:
        self._end_eval("test/bpd", prog_bar=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.restore(checkpoint)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Logged before clipping (Lightning clips after this hook): the norm the clip acts on.
        if not self._logs_this_step():
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))

    def configure_optimizers(self):
        optim_cfg = self.cfg.optim
        trainer = self._trainer  # None outside a Trainer
        mixed = trainer is not None and "mixed" in str(trainer.precision)
        optimizer = build_optimizer(optim_cfg.optimizer, self.parameters(), allow_fused=not mixed)
        factor = lr_factor(
            int(optim_cfg.get("warmup_steps", 0)),
            str(optim_cfg.get("decay", "none")),
            int(optim_cfg.get("total_steps", 0) or 0),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
