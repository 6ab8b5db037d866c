"""nfcv-export writes safetensors with the config; nfcv.load reads them like checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import nfcv
from nfcv.checkpoint import export_safetensors, load_checkpoint, read_safetensors
from nfcv.errors import CheckpointError


def _same_log_prob(a, b) -> None:
    x = torch.rand(4, *a.image_shape)
    assert torch.equal(a.log_prob(x), b.log_prob(x))


def test_export_round_trip_is_exact(tiny_run, tmp_path):
    out = export_safetensors(tiny_run["last_ckpt"], tmp_path / "model.safetensors")
    tensors, info = read_safetensors(out)
    assert info["config"]["model"]["name"] == "glow" and info["weights"] == "trained"
    stored = torch.load(tiny_run["last_ckpt"], weights_only=True)["hyper_parameters"]
    assert info["data_info"] == json.loads(json.dumps(stored["data_info"], default=str))
    assert info["data_info"]["name"] == "digits"
    assert all(isinstance(v, torch.Tensor) for v in tensors.values())
    exported, original = nfcv.load(out), nfcv.load(tiny_run["last_ckpt"])
    assert not exported.training and load_checkpoint(out).uses_ema is False
    assert exported.config.model == original.config.model
    _same_log_prob(exported, original)
    # One set of weights: asking for the other one is an error.
    with pytest.raises(CheckpointError, match="trained weights only"):
        nfcv.load(out, ema=True)


def test_the_export_command(tiny_run, tmp_path):
    out = tmp_path / "cmd.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "nfcv.cli.export", f"ckpt={tiny_run['last_ckpt']}", f"out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    _same_log_prob(nfcv.load(out), nfcv.load(tiny_run["last_ckpt"]))
    bad = subprocess.run(
        [sys.executable, "-m", "nfcv.cli.export", f"ckpt={tmp_path / 'none.ckpt'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "checkpoint not found" in bad.stderr


def test_damaged_or_foreign_safetensors_are_clear_errors(tiny_run, tmp_path):
    from safetensors.torch import save_file

    out = export_safetensors(tiny_run["last_ckpt"], tmp_path / "m.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        nfcv.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not an nfcv export"):
        nfcv.load(foreign)
    # A config naming code outside nfcv is refused, as in checkpoints.
    tensors, info = read_safetensors(out)
    info["config"]["model"]["flow"] = {"_target_": "builtins.print", "_args_": ["no"]}
    evil = tmp_path / "evil.safetensors"
    save_file(
        tensors,
        str(evil),
        metadata={"format": "nfcv-safetensors-1", "nfcv_config": json.dumps(info["config"])},
    )
    with pytest.raises(CheckpointError, match="builtins.print"):
        nfcv.load(evil)
