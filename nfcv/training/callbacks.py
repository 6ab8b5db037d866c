"""Training callbacks: sample and reconstruction grids and the per-image val bpd histogram to
TensorBoard, training speed.

The grids use ``pl_module.eval_model()`` when the module has it (the EMA weights once they
exist): the weights nfcv-sample would use.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import lightning as L
import torch

from nfcv.grid import reconstruction_grid, sample_grid


def _experiment(trainer: L.Trainer):
    """The logger's writer when it can take images and histograms (TensorBoard), else None."""
    if trainer.logger is None or not trainer.is_global_zero:
        return None
    experiment = getattr(trainer.logger, "experiment", None)
    return experiment if hasattr(experiment, "add_image") else None


def _eval_model(pl_module: L.LightningModule):
    get = getattr(pl_module, "eval_model", None)
    return get() if callable(get) else pl_module.model


def _due(trainer: L.Trainer, every_n_steps: int) -> bool:
    return every_n_steps > 0 and trainer.global_step % every_n_steps == 0


class SampleGridLogger(L.Callback):
    """Every `every_n_steps` optimizer steps, log a grid of samples (one row per temperature)."""

    def __init__(self, every_n_steps: int, temperatures: Sequence[float], per_row: int = 8):
        self.every_n_steps = int(every_n_steps)
        self.temperatures = [float(t) for t in temperatures]
        self.per_row = int(per_row)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        experiment = _experiment(trainer)
        if experiment is None or not _due(trainer, self.every_n_steps):
            return
        grid = sample_grid(_eval_model(pl_module), self.temperatures, self.per_row)
        experiment.add_image("samples", grid, global_step=trainer.global_step)


class ReconstructionLogger(L.Callback):
    """Every `every_n_steps` optimizer steps, log `num_images` fixed validation images above
    their reconstructions ``inverse(transform(x))`` (tag ``reconstructions``): they should match,
    and a mismatch shows a layer whose inverse has gone wrong (e.g. a diverged scale).

    The images are the first `num_images` of the data module's val split (``split("val")``),
    else of the first validation batch seen.
    """

    def __init__(self, every_n_steps: int, num_images: int = 8, per_row: int = 8):
        self.every_n_steps = int(every_n_steps)
        self.num_images = int(num_images)
        self.per_row = int(per_row)
        self.images: torch.Tensor | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if self.images is None and self.num_images > 0 and hasattr(datamodule, "split"):
            val = datamodule.split("val")
            self.images = torch.stack([val[i][0] for i in range(min(self.num_images, len(val)))])

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self.images is None and batch_idx == 0:
            self.images = batch[0][: self.num_images].detach().cpu().clone()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        experiment = _experiment(trainer)
        if experiment is None or self.num_images <= 0 or self.images is None:
            return
        if not _due(trainer, self.every_n_steps):
            return
        grid, _ = reconstruction_grid(_eval_model(pl_module), self.images, nrow=self.per_row)
        experiment.add_image("reconstructions", grid, global_step=trainer.global_step)


class ValBpdHistogram(L.Callback):
    """At the end of each validation (not the sanity check), a histogram of the per-image val
    bits per dim (tag ``val/bpd_per_image``): a long right tail points at images the model finds
    unlikely. Needs ``validation_step`` to return the per-image values."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.values = []

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if torch.is_tensor(outputs):
            self.values.append(outputs.detach().flatten())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.values:
            return
        values = torch.cat(self.values)
        if trainer.world_size > 1:  # every rank scored its own shard of the split
            values = pl_module.all_gather(values).flatten()
        self.values = []
        experiment = _experiment(trainer)
        if experiment is not None and hasattr(experiment, "add_histogram"):
            experiment.add_histogram(
                "val/bpd_per_image", values.float().cpu(), global_step=trainer.global_step
            )


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
