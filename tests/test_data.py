"""Dataset loaders on tiny files written in each dataset's real on-disk format."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

import nfcv
from nfcv.errors import DataError

MNIST_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_mnist_like(folder: Path, n_train=12, n_test=5, gz=False) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
    }
    for name, arr in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return arrays


def _datamodule(*overrides: str):
    cfg = nfcv.compose(list(overrides))
    return instantiate(cfg.data)


def _all_images(ds) -> np.ndarray:
    return ds.images.numpy()


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_in_torchvision_layout(tmp_path, name, folder):
    arrays = write_mnist_like(tmp_path / folder / "raw")
    dm = _datamodule(f"data={name}", f"data.root={tmp_path}", "data.val_size=4")
    dm.setup()
    train, val, test = dm.split("train"), dm.split("val"), dm.split("test")
    assert (len(train), len(val), len(test)) == (8, 4, 5)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 28, 28)
    np.testing.assert_array_equal(test.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    np.testing.assert_array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    # train + val is the training file, each image once
    seen = np.concatenate([_all_images(train), _all_images(val)])[:, 0]
    ref = arrays["train-images-idx3-ubyte"]
    assert sorted(map(bytes, seen)) == sorted(map(bytes, ref.astype(np.uint8)))


def test_flat_original_gz_files_are_staged(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))
    arrays = write_mnist_like(tmp_path / "fashion", gz=True)
    dm = _datamodule("data=fashion_mnist", f"data.root={tmp_path / 'fashion'}", "data.val_size=2")
    np.testing.assert_array_equal(
        dm.split("test").images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"]
    )
    assert list((tmp_path / "cache" / "staged").glob("*/FashionMNIST/raw/t10k-images-idx3-ubyte"))


def test_num_bits_reduces_depth(tmp_path):
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw")
    dm = _datamodule("data=mnist", f"data.root={tmp_path}", "data.val_size=2", "data.num_bits=5")
    assert dm.num_bins == 32
    np.testing.assert_array_equal(
        dm.split("test").images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"] >> 3
    )


def test_truncated_gz_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))
    write_mnist_like(tmp_path / "f", gz=True)
    bad = tmp_path / "f" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    dm = _datamodule("data=fashion_mnist", f"data.root={tmp_path / 'f'}", "data.val_size=2")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        dm.setup("fit")


def test_missing_files_say_where_and_how(tmp_path):
    dm = _datamodule("data=mnist", f"data.root={tmp_path}")
    with pytest.raises(DataError, match=r"download=true.*data\.root") as err:
        dm.setup("fit")
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def write_cifar10(root: Path, per_batch=3, n_test=4) -> dict[str, np.ndarray]:
    """CIFAR-10's python version: pickled dicts, 'data' rows of 3072 bytes (R plane, G, B)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
        written[name] = data
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes, "num_vis": 3072, "num_cases_per_batch": per_batch}, f)
    return written


def test_cifar10_pickle_batches(tmp_path):
    written = write_cifar10(tmp_path)
    dm = _datamodule(
        "data=cifar10",
        f"data.root={tmp_path}",
        "data.verify=false",
        "data.val_size=3",
        "data.num_workers=0",
    )
    test = dm.split("test")
    assert test.images.shape == (4, 3, 32, 32) and test.images.dtype == torch.uint8
    np.testing.assert_array_equal(
        test.images.numpy().reshape(4, -1),
        written["test_batch"],  # CHW order == file order
    )
    assert len(dm.split("train")) == 12 and len(dm.split("val")) == 3
    assert dm.split("train").hflip and not dm.split("val").hflip and not test.hflip


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path)
    dm = _datamodule("data=cifar10", f"data.root={tmp_path}", "data.num_workers=0")
    with pytest.raises(DataError, match="not found"):
        dm.setup("test")


def test_digits_splits_are_fixed_and_disjoint():
    dm = _datamodule("data=digits")
    dm.setup()
    sizes = [len(dm.split(s)) for s in ("train", "val", "test")]
    assert sizes == [1350, 150, 297]
    assert dm.split("train").images.max() == 16
    again = _datamodule("data=digits")
    torch.testing.assert_close(again.split("val").images, dm.split("val").images)
    rows = {
        bytes(x.numpy()) + bytes([int(y)])
        for x, y in zip(dm.split("test").images, dm.split("test").labels, strict=True)
    }
    train_rows = {
        bytes(x.numpy()) + bytes([int(y)])
        for x, y in zip(dm.split("train").images, dm.split("train").labels, strict=True)
    }
    # digits has a few exact duplicate images; disjoint indices keep overlap to those
    assert len(rows & train_rows) <= 5


SHARED_FASHION = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-mnist"


@pytest.mark.skipif(
    not SHARED_FASHION.is_dir(), reason="the shared Fashion-MNIST files are absent"
)
def test_real_fashion_mnist_files(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))
    dm = _datamodule("data=fashion_mnist", f"data.root={SHARED_FASHION}")
    dm.setup()
    assert [len(dm.split(s)) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert int(dm.split("test").images.max()) == 255
