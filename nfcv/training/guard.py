"""Numerical guard: non-finite losses and gradients never reach the weights.

Flows overflow now and then (an exp of a large scale, a near-singular 1x1 conv). `NumericalGuard`
checks the loss and the gradients before every optimizer step (after backward, before clipping):

- a non-finite one: the gradients are dropped, so the optimizer leaves the weights (and its own
  moments) as they were; the step is counted (``guard/skipped_steps`` in TensorBoard) and training
  goes on;
- ``max_bad_steps`` bad steps in a row: the weights, optimizer and EMA roll back to the last good
  checkpoint (``last.ckpt``; before the first one, the state at the start of training) and the
  learning rate is multiplied by ``lr_factor`` (``guard/rollbacks``, ``guard/lr_scale``); the
  step counter keeps going;
- one rollback more than ``max_rollbacks``: the run stops with `TrainingDiverged` (nfcv-train
  prints the message and exits with status 2; ``last.ckpt`` is left as it was).

The counters are saved with checkpoints, so a resumed run keeps its lowered learning rate (the
scheduler's state) and its rollback count.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from nfcv.errors import NfcvError

log = logging.getLogger("nfcv")


class TrainingDiverged(NfcvError):
    """Training kept producing non-finite losses or gradients after every rollback."""


def _finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return bool(torch.stack(flags).all()) if flags else True


def _all_finite(loss: torch.Tensor | None, grads: list[torch.Tensor]) -> torch.Tensor | None:
    """A device flag: the loss and every gradient are finite. The gradients' largest absolute
    value (one fused pass over all of them) is finite exactly when each gradient is, NaN
    included; nothing is read on the host here."""
    flags = []
    if loss is not None:
        flags.append(torch.isfinite(loss).all())
    if grads:
        flags.append(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))
    return torch.stack(flags).all() if flags else None


class NumericalGuard(L.Callback):
    """Skip steps with a non-finite loss or gradient; roll back after `max_bad_steps` in a row;
    stop after `max_rollbacks` rollbacks. See the module docstring."""

    def __init__(
        self,
        ckpt_path: str | Path,
        max_bad_steps: int = 5,
        lr_factor: float = 0.5,
        max_rollbacks: int = 3,
        check_grads: bool | None = None,
    ):
        if max_bad_steps < 1:
            raise ValueError(f"callbacks.guard.max_bad_steps must be >= 1, got {max_bad_steps}")
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"callbacks.guard.lr_factor must be in (0, 1], got {lr_factor}")
        self.ckpt_path = Path(ckpt_path)
        self.max_bad_steps = int(max_bad_steps)
        self.lr_factor = float(lr_factor)
        self.max_rollbacks = int(max_rollbacks)
        # None: check gradients unless training in float16, whose GradScaler skips its own
        # overflowing steps (not a divergence).
        self.check_grads = check_grads
        self._loss: torch.Tensor | None = None
        self.skipped = 0  # bad steps in all
        self.consecutive = 0
        self.rollbacks = 0
        self.lr_scale = 1.0
        self._rollback_pending = False
        self._snapshot: dict[str, Any] | None = None

    # -- state saved with checkpoints ------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "rollbacks": self.rollbacks, "lr_scale": self.lr_scale}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.rollbacks = int(state_dict.get("rollbacks", 0))
        self.lr_scale = float(state_dict.get("lr_scale", 1.0))

    # -- hooks -----------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.check_grads is None:
            self.check_grads = not str(trainer.precision).startswith("16")

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss = loss.detach()  # checked with the gradients before the optimizer step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.ckpt_path.is_file():
            # Nothing on disk to go back to yet: keep the starting state (on the CPU).
            self._snapshot = {
                "state_dict": {
                    k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()
                },
                "optimizer_states": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
            }
            if getattr(pl_module, "ema", None) is not None:
                pl_module.ema.save(self._snapshot)
                self._snapshot = copy.deepcopy(self._snapshot)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # One device-to-host read per step, the decision itself: the checks and (under DDP) the
        # agreement between ranks run on the device.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        loss, self._loss = self._loss, None
        grads = [p.grad for p in params if p.grad is not None] if self.check_grads else []
        flag = _all_finite(loss, grads)
        if trainer.world_size > 1:  # every rank must take the same decision
            if flag is None:
                flag = torch.ones((), dtype=torch.bool, device=pl_module.device)
            bad = (~flag).float()
            flag = trainer.strategy.reduce(bad, reduce_op="max") == 0
        ok = flag is None or bool(flag)
        if ok:
            self.consecutive = 0
            return
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient
        self.skipped += 1
        self.consecutive += 1
        log.warning(
            "nfcv guard: non-finite %s at step %d: step skipped (%d in a row, %d in all)",
            "loss" if loss is not None and not _finite([loss]) else "gradient",
            trainer.global_step,
            self.consecutive,
            self.skipped,
        )
        if self.consecutive >= self.max_bad_steps:
            self._rollback_pending = True
        self._log(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._rollback_pending:
            return
        self._rollback_pending = False
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingDiverged(
                f"training diverged: {self.consecutive} steps in a row with a non-finite loss or "
                f"gradient at step {trainer.global_step}, after {self.rollbacks} rollback(s) with "
                f"the learning rate lowered to {self.lr_scale:g} x its configured value "
                f"({self.skipped} steps skipped in all). {self.ckpt_path} holds the last good "
                "state. Lower optim.optimizer.lr, add trainer.gradient_clip_val, or raise "
                "callbacks.guard.max_rollbacks"
            )
        self._rollback(trainer, pl_module)

    # -- rollback --------------------------------------------------------------------------------

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from nfcv.checkpoint import read_checkpoint

        if self.ckpt_path.is_file():
            state, source = read_checkpoint(self.ckpt_path), str(self.ckpt_path)
        elif self._snapshot is not None:
            state, source = self._snapshot, "the start of training"
        else:
            raise TrainingDiverged(
                f"training diverged at step {trainer.global_step} and there is no checkpoint to "
                f"roll back to ({self.ckpt_path} does not exist)"
            )
        pl_module.load_state_dict(state["state_dict"])
        for optimizer, opt_state in zip(
            trainer.optimizers, state["optimizer_states"], strict=True
        ):
            optimizer.load_state_dict(opt_state)
        if getattr(pl_module, "ema", None) is not None:
            pl_module.ema.restore(state)
        self.rollbacks += 1
        self.lr_scale *= self.lr_factor
        # The schedulers set lr = base_lr * factor(step) at every step: scale their base (kept
        # in their state, which is not rolled back) and set the current rate from it.
        scheduled = set()
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if hasattr(scheduler, "base_lrs"):
                scheduler.base_lrs = [lr * self.lr_factor for lr in scheduler.base_lrs]
                lambdas = getattr(scheduler, "lr_lambdas", None)
                groups = scheduler.optimizer.param_groups
                for i, (group, base) in enumerate(zip(groups, scheduler.base_lrs, strict=True)):
                    factor = lambdas[i](scheduler.last_epoch) if lambdas else 1.0
                    group["lr"] = base * factor
                scheduled.add(id(scheduler.optimizer))
        for optimizer in trainer.optimizers:
            if id(optimizer) not in scheduled:
                for group in optimizer.param_groups:
                    group["lr"] *= self.lr_scale
        self.consecutive = 0
        log.warning(
            "nfcv guard: rolled back to %s at step %d with the learning rate x%g (rollback %d of "
            "at most %d)",
            source,
            trainer.global_step,
            self.lr_scale,
            self.rollbacks,
            self.max_rollbacks,
        )
        self._log(trainer)

    def _log(self, trainer: L.Trainer) -> None:
        metrics = {
            "guard/skipped_steps": float(self.skipped),
            "guard/rollbacks": float(self.rollbacks),
            "guard/lr_scale": self.lr_scale,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
