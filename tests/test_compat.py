"""Files written by earlier nfcv versions still load, evaluate and sample.

``tests/fixtures/glow-digits-v0.1.0.*`` were written by the code before the package restructure
(a tiny Glow on the digits, trained 2 steps with an EMA): the checkpoint, its safetensors export
of the trained weights, and the log-probabilities that code computed for four fixed images.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nfcv
from nfcv.checkpoint import load_checkpoint
from nfcv.cli.eval import evaluate
from nfcv.cli.sample import sample

FIXTURES = Path(__file__).parent / "fixtures"
CKPT = FIXTURES / "glow-digits-v0.1.0.ckpt"
EXPORT = FIXTURES / "glow-digits-v0.1.0.safetensors"
EXPECTED = torch.load(FIXTURES / "glow-digits-v0.1.0.expected.pt", weights_only=True)


@pytest.mark.parametrize(
    ("path", "ema", "key"),
    [(CKPT, False, "log_prob"), (CKPT, True, "log_prob_ema"), (EXPORT, None, "log_prob")],
    ids=["ckpt-trained", "ckpt-ema", "safetensors"],
)
def test_old_files_load_to_the_same_densities(path, ema, key):
    loaded = load_checkpoint(path, ema=ema)
    assert loaded.uses_ema == (key == "log_prob_ema")
    assert loaded.config.model.name == "glow" and loaded.data_info["name"] == "digits"
    with torch.no_grad():
        got = loaded.model.log_prob(EXPECTED["x"])
    torch.testing.assert_close(got, EXPECTED[key], rtol=1e-6, atol=1e-5)


def test_old_checkpoint_evaluates_and_samples(tmp_path):
    args = [f"ckpt={CKPT}", "split=test", "progress=false", f"out={tmp_path / 'e.json'}"]
    record = evaluate(nfcv.compose(args, config_name="eval"))
    assert record["num_images"] > 0 and 0 < record["bpd"] < 8
    out = sample(
        nfcv.compose([f"ckpt={CKPT}", "n=4", f"out={tmp_path / 's.png'}"], config_name="sample")
    )
    assert out.is_file() and out.stat().st_size > 0
