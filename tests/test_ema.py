"""The exponential moving average of the weights: its arithmetic, checkpoints, resume, and that
nfcv.load, nfcv-eval and nfcv-sample use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import nfcv
from nfcv.checkpoint import load_checkpoint
from nfcv.errors import CheckpointError, ConfigError
from nfcv.training.ema import EMA


def test_first_update_copies_then_averages_with_a_ramped_decay():
    model = nn.Linear(3, 2)
    model.register_buffer("flag", torch.tensor(0))
    ema = EMA(0.9, lambda: _linear_with_flag())
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight)  # a copy, not an average from 0
    assert not ema.model.training and not ema.model.weight.requires_grad
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.flag.fill_(1)
    ema.update(model)
    d = min(0.9, 2 / 11)  # ramp at n=1: (1 + n) / (10 + n)
    torch.testing.assert_close(ema.model.weight, torch.full((2, 3), d * 1.0 + (1 - d) * 3.0))
    assert int(ema.model.flag) == 1  # buffers are copied
    for _ in range(200):
        ema.update(model)
    assert ema.current_decay() == 0.9


def _linear_with_flag() -> nn.Module:
    m = nn.Linear(3, 2)
    m.register_buffer("flag", torch.tensor(0))
    return m


@pytest.mark.parametrize("decay", [0.0, 1.0, 1.5, "fast"])
def test_bad_decay_is_a_config_error(decay):
    with pytest.raises(ConfigError, match="ema.decay"):
        EMA(decay, _linear_with_flag)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    from conftest import _tiny_overrides

    from nfcv.training.run import train

    root = tmp_path_factory.mktemp("ema")
    # lr 1e-2 without warmup: weights that move in 4 steps, so the average differs visibly.
    overrides = _tiny_overrides(
        **{"ema.decay": "0.9", "optim.warmup_steps": "0", "optim.optimizer.lr": "1e-2"}
    )
    summary = train(nfcv.compose(overrides), run_dir=root / "run")
    return root, summary, overrides


def test_checkpoints_hold_ema_weights_that_differ_from_the_trained_ones(ema_run):
    _, summary, _ = ema_run
    ckpt = torch.load(summary["last_ckpt"], weights_only=True)
    assert ckpt["ema"] == {"decay": 0.9, "num_updates": 4}
    averaged, trained = nfcv.load(summary["last_ckpt"]), nfcv.load(summary["last_ckpt"], ema=False)
    assert load_checkpoint(summary["last_ckpt"]).uses_ema
    assert not load_checkpoint(summary["last_ckpt"], ema=False).uses_ema
    explicit = nfcv.load(summary["last_ckpt"], ema=True)
    pairs = zip(averaged.parameters(), trained.parameters(), strict=True)
    gaps = [(a - b).abs().max().item() for a, b in pairs]
    assert max(gaps) > 1e-4
    for a, b in zip(averaged.parameters(), explicit.parameters(), strict=True):
        assert torch.equal(a, b)
    # The state dict of the run's module holds the trained weights only.
    assert not any(k.startswith("ema") for k in ckpt["state_dict"])
    assert ckpt["ema_state_dict"].keys() == trained.state_dict().keys()


def test_validation_and_test_use_the_ema_weights(ema_run):
    """The test bpd the run reports is the EMA model's on the test split."""
    _, summary, _ = ema_run
    module = summary["module"]  # restored from the best checkpoint by trainer.test
    best = nfcv.load(summary["best_ckpt"])
    for a, b in zip(module.eval_model().parameters(), best.parameters(), strict=True):
        assert torch.equal(a, b)
    assert module.eval_model() is not module.model


def test_eval_uses_ema_by_default_and_ema_false_the_trained_weights(ema_run, tmp_path):
    from nfcv.cli.eval import evaluate

    _, summary, _ = ema_run
    base = [f"ckpt={summary['last_ckpt']}", "progress=false", "split=val"]

    def run(*extra):
        cfg = nfcv.compose([*base, *extra, f"out={tmp_path / 'e.json'}"], config_name="eval")
        return evaluate(cfg)

    default, on, off = run(), run("ema=true"), run("ema=false")
    assert default["ema"] and on["ema"] and not off["ema"]
    assert default["bpd"] == on["bpd"] != off["bpd"]
    # By hand: seed 0, then the EMA model's bits_per_dim over the val split (one batch).
    from hydra.utils import instantiate

    model = nfcv.load(summary["last_ckpt"])
    x = instantiate(model.config.data).split("val").images
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model.bits_per_dim(x, k=1).double().mean().item()
    assert default["bpd"] == pytest.approx(expected, abs=1e-5)


def test_ema_true_without_ema_weights(tiny_run):
    with pytest.raises(CheckpointError, match="no EMA weights"):
        nfcv.load(tiny_run["last_ckpt"], ema=True)
    assert not load_checkpoint(tiny_run["last_ckpt"]).uses_ema


@pytest.mark.filterwarnings("ignore:The dirpath has changed", "ignore:You're resuming")
def test_resume_restores_the_average(ema_run, tmp_path):
    """Resuming from last.ckpt continues the average (4 + 2 updates), not a fresh copy (2)."""
    from nfcv.training.run import train

    _, summary, overrides = ema_run
    resumed = train(
        nfcv.compose([*overrides, "trainer.max_steps=6", f"ckpt_path={summary['last_ckpt']}"]),
        run_dir=tmp_path / "resumed",
    )
    ckpt = torch.load(resumed["last_ckpt"], weights_only=True)
    assert ckpt["global_step"] == 6
    assert ckpt["ema"]["num_updates"] == 6


def test_restore_round_trip(ema_run):
    from nfcv.training.module import FlowModule

    _, summary, _ = ema_run
    ckpt = torch.load(summary["last_ckpt"], weights_only=True)
    module = FlowModule(ckpt["hyper_parameters"]["cfg"])
    assert module.eval_model() is module.model  # no average before the first update
    module.on_load_checkpoint(ckpt)
    state = module.eval_model().state_dict()
    for key, value in ckpt["ema_state_dict"].items():
        assert torch.equal(state[key], value), key
    assert module.ema.num_updates == 4
    module.on_load_checkpoint({k: v for k, v in ckpt.items() if not k.startswith("ema")})
    assert module.eval_model() is module.model


def test_sample_uses_ema(ema_run, tmp_path):
    from nfcv.cli.sample import sample

    _, summary, _ = ema_run
    outs = {}
    for ema in ("null", "false"):
        cfg = nfcv.compose(
            [f"ckpt={summary['last_ckpt']}", f"ema={ema}", "n=4", f"out={tmp_path / ema}.png"],
            config_name="sample",
        )
        outs[ema] = Path(sample(cfg)).read_bytes()
    assert outs["null"] != outs["false"]
