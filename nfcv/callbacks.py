"""Training callbacks: sample grids to TensorBoard."""

from __future__ import annotations

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
