from __future__ import annotations

import os

import pytest
import torch

# Tests run on 2 CI cores: keep PyTorch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_overrides(**extra: str) -> list[str]:
    """Overrides for a Glow small enough to train in a second on digits."""
    base = {
        "model.hidden": "8",
        "model.steps": "1",
        "model.levels": "2",
        "trainer.max_steps": "4",
        "trainer.val_check_interval": "2",
        "trainer.enable_progress_bar": "false",
        "trainer.accelerator": "cpu",
        "sample.every_n_steps": "2",
        "sample.per_row": "2",
        "data.batch_size": "16",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture
def tiny():
    """``tiny(**overrides) -> list[str]``: Hydra overrides for a tiny, seconds-long Glow run."""
    return _tiny_overrides


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny in-process training run (real Trainer, checkpoints on disk), shared by tests."""
    import nfcv
    from nfcv.training.run import train

    return train(nfcv.compose(_tiny_overrides()), run_dir=tmp_path_factory.mktemp("tiny") / "run")
