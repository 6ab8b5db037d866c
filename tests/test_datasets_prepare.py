"""scripts/prepare_data.py: argument handling and the verification step, on tiny files (it cannot
download here: no internet)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from test_data import write_cifar10
from test_datasets import write_imagenet

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_data.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))


def test_needs_name_and_root(script, capsys):
    with pytest.raises(SystemExit) as exit_:
        script.main([])
    assert exit_.value.code == 2
    assert "NAME" in capsys.readouterr().err


def test_unknown_name_lists_the_datasets(script, capsys, tmp_path):
    assert script.main(["cifar11", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'cifar11'" in err
    for name in ("cifar10", "cifar100", "svhn", "celeba64", "celeba_hq", "imagenet64", "folder"):
        assert name in err


def test_overrides_must_be_key_value(script, capsys, tmp_path):
    assert script.main(["cifar10", str(tmp_path), "verify"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert script.main(["cifar10", str(tmp_path), "no_such_key=1"]) == 2
    assert "cannot build data=cifar10" in capsys.readouterr().err


def test_verifies_files_and_prints_the_record(script, capsys, tmp_path):
    write_cifar10(tmp_path)
    assert (
        script.main(["cifar10", str(tmp_path), "--no-download", "verify=false", "val_size=5"]) == 0
    )
    out, err = capsys.readouterr()
    record = json.loads(out)
    assert record["name"] == "cifar10"
    assert record["split_sizes"] == {"train": 10, "val": 5, "test": 4}
    assert record["files"]["count"] == 7 and len(record["files"]["sha256"]) == 64
    assert f"NFCV_DATA={tmp_path} nfcv-train data=cifar10" in err
    assert record["files"]["sha256"] in err


def test_verification_failure_names_the_file_exit_2(script, capsys, tmp_path):
    write_cifar10(tmp_path)
    # torchvision's MD5s are checked by default: the tiny batches are not the real ones
    assert script.main(["cifar10", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert "data_batch_1 does not match torchvision's MD5" in err and "Traceback" not in err
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    bad.write_bytes(bad.read_bytes()[:500])
    assert (
        script.main(["cifar10", str(tmp_path), "--no-download", "verify=false", "val_size=5"]) == 2
    )
    assert f"cannot read {bad}" in capsys.readouterr().err


def test_present_files_are_not_fetched_again(script, tmp_path):
    """With download on, files already there are used as they are (no network here)."""
    write_cifar10(tmp_path)
    record = script.prepare(
        "cifar10", str(tmp_path), download=True, overrides=["verify=false", "val_size=5"]
    )
    assert record["files"]["count"] == 7


def test_missing_files_say_how_to_get_them(script, capsys, tmp_path):
    assert script.main(["svhn", str(tmp_path), "--no-download"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "svhn" / "train_32x32.mat") in err
    assert script.main(["imagenet32", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "cannot be downloaded automatically" in err and "image-net.org" in err


def test_imagenet_is_verified_and_converted(script, tmp_path):
    write_imagenet(tmp_path / "imagenet32")
    record = script.prepare("imagenet32", str(tmp_path), download=False, overrides=["val_size=5"])
    assert record["split_sizes"] == {"train": 25, "val": 5, "test": 4}
    assert list((tmp_path / "cache" / "arrays").glob("imagenet32-*/train_images.npy"))


def test_digits_needs_no_root(script, capsys, tmp_path):
    assert script.main(["digits", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["count"] == 1
