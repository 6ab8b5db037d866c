"""The numerical guard: non-finite steps are skipped, runs roll back, and stop with a message."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import nfcv
from nfcv.training.guard import NumericalGuard, TrainingDiverged
from nfcv.training.run import train


class PoisonGrad(L.Callback):
    """After backward at the given steps, one gradient becomes inf."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.weights_before: dict[int, torch.Tensor] = {}

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            p = next(p for p in pl_module.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("inf")
            self.weights_before[trainer.global_step] = torch.cat(
                [q.detach().flatten().clone() for q in pl_module.model.parameters()]
            )


class PoisonWeight(L.Callback):
    """From step `start` on (every step, or once), one weight becomes NaN: the loss is NaN."""

    def __init__(self, start: int, once: bool):
        self.start, self.once = start, once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.start or (
            not self.once and trainer.global_step > self.start
        ):
            with torch.no_grad():
                next(pl_module.model.parameters()).view(-1)[0] = float("nan")


def _guard(trainer: L.Trainer) -> NumericalGuard:
    return next(c for c in trainer.callbacks if isinstance(c, NumericalGuard))


def _weights(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def test_a_non_finite_gradient_skips_the_step(tiny, tmp_path):
    poison = PoisonGrad([1, 3])
    summary = train(
        nfcv.compose(tiny(**{"trainer.max_steps": "5"})), tmp_path / "run", callbacks=[poison]
    )
    trainer = summary["module"].trainer
    guard = _guard(trainer)
    assert (guard.skipped, guard.rollbacks, guard.lr_scale) == (2, 0, 1.0)
    assert summary["steps"] == 5 and torch.isfinite(_weights(summary["module"])).all()
    # The checkpoint carries the counters (a resumed run keeps them).
    ckpt = torch.load(summary["last_ckpt"], weights_only=True)
    state = next(v for k, v in ckpt["callbacks"].items() if "NumericalGuard" in k)
    assert state["skipped"] == 2


def test_skipped_step_leaves_the_weights_unchanged(tiny, tmp_path):
    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # step 2 (0-based) just ran, poisoned
                self.after = _weights(pl_module).clone()

    poison, watch = PoisonGrad([2]), Watch()
    train(
        nfcv.compose(tiny(**{"trainer.max_steps": "4", "trainer.val_check_interval": "4"})),
        tmp_path / "run",
        callbacks=[poison, watch],
    )
    assert torch.equal(poison.weights_before[2], watch.after)


def test_consecutive_bad_steps_roll_back_with_a_lower_lr(tiny, tmp_path):
    # last.ckpt is written at step 6 (validation every 2 steps); a NaN weight at step 6 makes
    # every later loss NaN until the rollback (after step 7) restores the weights of step 6.
    overrides = tiny(**{"trainer.max_steps": "10", "callbacks.guard.max_bad_steps": "2"})
    summary = train(nfcv.compose(overrides), tmp_path / "run", callbacks=[PoisonWeight(6, True)])
    module = summary["module"]
    guard = _guard(module.trainer)
    assert (guard.skipped, guard.rollbacks, guard.lr_scale) == (2, 1, 0.5)
    assert summary["steps"] == 10 and torch.isfinite(_weights(module)).all()
    lr = nfcv.compose(overrides).optim.optimizer.lr
    scheduler = module.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [pytest.approx(0.5 * lr)]
    assert module.trainer.optimizers[0].param_groups[0]["lr"] <= 0.5 * lr + 1e-12
    assert summary["test_bpd"] == summary["test_bpd"]  # not NaN
    # TensorBoard has the counters.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tb")).Reload()
    assert {"guard/skipped_steps", "guard/rollbacks", "guard/lr_scale"} <= set(
        events.Tags()["scalars"]
    )
    assert events.Scalars("guard/rollbacks")[-1].value == 1


def test_before_the_first_checkpoint_it_rolls_back_to_the_start(tiny, tmp_path):
    overrides = tiny(**{"trainer.max_steps": "4", "callbacks.guard.max_bad_steps": "1"})
    summary = train(nfcv.compose(overrides), tmp_path / "run", callbacks=[PoisonWeight(1, True)])
    guard = _guard(summary["module"].trainer)
    assert (guard.skipped, guard.rollbacks) == (1, 1)
    assert torch.isfinite(_weights(summary["module"])).all()


def test_persistent_divergence_stops_with_a_clear_error(tiny, tmp_path):
    overrides = tiny(
        **{
            "trainer.max_steps": "20",
            "callbacks.guard.max_bad_steps": "2",
            "callbacks.guard.max_rollbacks": "1",
        }
    )
    with pytest.raises(
        TrainingDiverged, match=r"after 1 rollback\(s\).*callbacks.guard.max_rollbacks"
    ):
        train(nfcv.compose(overrides), tmp_path / "run", callbacks=[PoisonWeight(6, False)])
    assert nfcv.load(tmp_path / "run" / "checkpoints" / "last.ckpt") is not None


def test_the_guard_can_be_switched_off(tiny, tmp_path):
    overrides = tiny(**{"trainer.max_steps": "2", "callbacks.guard": "null"})
    summary = train(nfcv.compose(overrides), tmp_path / "run")
    assert not any(isinstance(c, NumericalGuard) for c in summary["module"].trainer.callbacks)
