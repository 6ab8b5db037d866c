"""Training callbacks: sample grids to TensorBoard, training speed."""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L

from nfcv.grid import sample_grid


class SampleGridLogger(L.Callback):
    """Every `every_n_steps` optimizer steps, log a grid of samples (one row per temperature)."""

    def __init__(self, every_n_steps: int, temperatures: Sequence[float], per_row: int = 8):
        self.every_n_steps = int(every_n_steps)
        self.temperatures = [float(t) for t in temperatures]
        self.per_row = int(per_row)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps or trainer.logger is None:
            return
        if not trainer.is_global_zero:
            return
        grid = sample_grid(pl_module.model, self.temperatures, self.per_row)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples", grid, global_step=step)


class TrainSpeed(L.Callback):
    """Training images per second over optimizer steps only (forward, backward, update; not
    validation, sampling or start-up), skipping the first `warmup` steps."""

    def __init__(self, warmup: int = 5):
        self.warmup = warmup
        self.seconds = 0.0
        self.images = 0
        self._start: float | None = None
        self._seen = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += 1
        if self._start is None or self._seen <= self.warmup:
            return
        self.seconds += time.perf_counter() - self._start
        self.images += int(batch[0].shape[0])

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")
