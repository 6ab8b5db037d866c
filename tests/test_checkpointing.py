"""What a run's checkpoints hold: last.ckpt the final state, best-step*.ckpt the best."""

from __future__ import annotations

from pathlib import Path

import torch


def test_last_checkpoint_holds_the_final_step_and_best_the_best(tiny_run):
    """4 steps, validation after steps 2 and 4: last.ckpt is step 4 even when step 4 does not
    improve on the best (Lightning's save_last would have left it at the best step)."""
    last = torch.load(tiny_run["last_ckpt"], weights_only=True)
    assert Path(tiny_run["last_ckpt"]).name == "last.ckpt"
    assert last["global_step"] == tiny_run["steps"] == 4
    best = torch.load(tiny_run["best_ckpt"], weights_only=True)
    assert Path(tiny_run["best_ckpt"]).name == f"best-step{best['global_step']}.ckpt"
    assert best["global_step"] in (2, 4)


def test_last_checkpoint_after_steps_past_the_last_validation(tmp_path, tiny):
    import nfcv
    from nfcv.training.run import train

    summary = train(
        nfcv.compose(tiny(**{"trainer.max_steps": "3", "sample.every_n_steps": "0"})),
        run_dir=tmp_path / "run",
    )
    assert torch.load(summary["last_ckpt"], weights_only=True)["global_step"] == 3
    assert torch.load(summary["best_ckpt"], weights_only=True)["global_step"] == 2
