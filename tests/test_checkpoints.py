"""Loading checkpoints never runs code from them, and damaged ones give clear errors."""

from __future__ import annotations

import pytest
import torch

import nfcv
from nfcv.errors import CheckpointError


class _RunsCodeOnLoad:
    """Unpickling this creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused_and_does_not_run(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run["last_ckpt"], weights_only=True)
    marker = tmp_path / "pwned"
    ckpt["callbacks"] = {"evil": _RunsCodeOnLoad(marker)}
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        nfcv.load(path)
    assert not marker.exists()


def test_config_targets_outside_nfcv_are_refused(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run["last_ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["model"]["flow"] = {
        "_target_": "builtins.print",
        "_args_": ["this must not print"],
    }
    path = tmp_path / "target.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"'builtins.print' at model\.flow"):
        nfcv.load(path)


def test_checkpoint_without_config_or_weights(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run["last_ckpt"], weights_only=True)
    del ckpt["hyper_parameters"]["cfg"]
    torch.save(ckpt, tmp_path / "nocfg.ckpt")
    with pytest.raises(CheckpointError, match="not an nfcv checkpoint"):
        nfcv.load(tmp_path / "nocfg.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.ckpt")
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        nfcv.load(tmp_path / "plain.ckpt")


def test_mismatched_weights_are_a_clear_error(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run["last_ckpt"], weights_only=True)
    ckpt["hyper_parameters"]["cfg"]["model"]["flow"]["steps_per_level"] = 2  # resolved: the source
    torch.save(ckpt, tmp_path / "mismatch.ckpt")
    with pytest.raises(CheckpointError, match="do not match"):
        nfcv.load(tmp_path / "mismatch.ckpt")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04garbage"])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        nfcv.load(path)


def test_every_torch_load_in_the_source_is_weights_only():
    import ast
    from pathlib import Path

    root = Path(nfcv.__file__).parent
    calls = 0
    for file in root.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                calls += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert "weights_only" in kw, f"{file}:{node.lineno}"
                assert isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value
    assert calls >= 1
