"""Data modules on tiny files written in each dataset's real on-disk format: MNIST-family IDX,
CIFAR-10 pickles, digits; the checks, the missing-files message and the record of the files.
The other datasets are in test_datasets.py."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import nfcv
import nfcv.data
from nfcv.errors import DataError

MNIST_FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}
CONFIGS = Path(nfcv.__file__).resolve().parent.parent / "configs" / "data"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Each test its own $NFCV_CACHE (staged files, checksums), so none sees another's."""
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))


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
    dm = _datamodule(
        f"data={name}", f"data.root={tmp_path}", "data.val_size=4", "data.batch_size=8"
    )
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
    # what the model sees: uint8 batches of the configured shape, no flips for digits
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.uint8 and x.shape == (8, 1, 28, 28) and y.dtype == torch.int64
    assert not train.hflip


def test_flat_original_gz_files_are_staged(tmp_path):
    arrays = write_mnist_like(tmp_path / "fashion", gz=True)
    dm = _datamodule("data=fashion_mnist", f"data.root={tmp_path / 'fashion'}", "data.val_size=2")
    np.testing.assert_array_equal(
        dm.split("test").images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"]
    )
    assert list((tmp_path / "cache" / "staged").glob("*/FashionMNIST/raw/t10k-images-idx3-ubyte"))
    # the record names the files the user has (the .gz), not the staged copies
    listed = {f["path"] for f in dm.describe()["files"]["list"]}
    assert listed == {f"{n}.gz" for n in MNIST_FILES}


def test_num_bits_reduces_depth(tmp_path):
    arrays = write_mnist_like(tmp_path / "MNIST" / "raw")
    dm = _datamodule("data=mnist", f"data.root={tmp_path}", "data.val_size=2", "data.num_bits=5")
    assert dm.num_bins == 32
    np.testing.assert_array_equal(
        dm.split("test").images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"] >> 3
    )
    assert dm.describe()["preprocessing"]["reduction"] == "x >> 3"


def test_num_bins_that_contradicts_num_bits_is_refused(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    dm = _datamodule("data=mnist", f"data.root={tmp_path}", "data.num_bins=128")
    with pytest.raises(DataError, match=r"num_bins=128 but data.num_bits=8"):
        dm.setup("fit")


def test_truncated_gz_names_the_file(tmp_path):
    write_mnist_like(tmp_path / "f", gz=True)
    bad = tmp_path / "f" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    dm = _datamodule("data=fashion_mnist", f"data.root={tmp_path / 'f'}", "data.val_size=2")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        dm.setup("fit")


@pytest.mark.parametrize("name", ["t10k-images-idx3-ubyte", "train-labels-idx1-ubyte"])
def test_truncated_idx_file_names_the_file(tmp_path, name):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    bad = tmp_path / "MNIST" / "raw" / name
    bad.write_bytes(bad.read_bytes()[:-7])
    dm = _datamodule("data=mnist", f"data.root={tmp_path}", "data.val_size=2")
    # at the fit setup too: a damaged test file must not wait until after training
    with pytest.raises(DataError, match=rf"{bad}.*truncated or corrupt"):
        dm.setup("fit")


def test_missing_files_say_where_and_how(tmp_path):
    dm = _datamodule("data=mnist", f"data.root={tmp_path}")
    with pytest.raises(DataError, match=r"download=true.*data\.root") as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert f"python scripts/prepare_data.py mnist {tmp_path}" in message
    assert "NFCV_DATA" in message


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
        written[name + "_labels"] = np.array(labels)
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
    np.testing.assert_array_equal(test.labels.numpy(), written["test_batch_labels"])
    assert len(dm.split("train")) == 12 and len(dm.split("val")) == 3
    assert dm.split("train").hflip and not dm.split("val").hflip and not test.hflip


def test_cifar10_checksums_are_verified_by_default(tmp_path):
    write_cifar10(tmp_path)
    dm = _datamodule("data=cifar10", f"data.root={tmp_path}", "data.num_workers=0")
    with pytest.raises(DataError, match=r"data_batch_1 does not match torchvision's MD5") as err:
        dm.setup("test")
    assert "data.verify=false" in str(err.value)


def test_cifar10_corrupt_batch_names_the_file(tmp_path):
    write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:1000])
    dm = _datamodule("data=cifar10", f"data.root={tmp_path}", "data.verify=false")
    with pytest.raises(DataError, match=rf"cannot read {bad} .*truncated or corrupt"):
        dm.setup("fit")


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


# -- the record of what a run saw


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_describe_records_name_sizes_preprocessing_and_checksums(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    dm = _datamodule("data=mnist", f"data.root={tmp_path}", "data.val_size=4")
    dm.setup()
    info = dm.describe()
    assert info["name"] == "mnist" and info["image_shape"] == [1, 28, 28]
    assert info["num_bins"] == 256 and info["num_classes"] == 10
    assert info["split_sizes"] == {"train": 8, "val": 4, "test": 5}
    assert info["preprocessing"]["num_bits"] == 8 and info["preprocessing"]["hflip_train"] is False
    assert "4 training images drawn with split_seed=0" in info["preprocessing"]["val"]
    files = info["files"]
    raw = tmp_path / "MNIST" / "raw"
    listed = {f["path"]: f["sha256"] for f in files["list"]}
    assert listed == {f"MNIST/raw/{n}": _sha256(raw / n) for n in MNIST_FILES}
    assert files["count"] == 4
    assert files["bytes"] == sum((raw / n).stat().st_size for n in MNIST_FILES)
    # the combined digest: sha256 over "path<TAB>bytes<TAB>sha256" lines in path order
    lines = "".join(
        f"MNIST/raw/{n}\t{(raw / n).stat().st_size}\t{_sha256(raw / n)}\n"
        for n in sorted(MNIST_FILES)
    )
    assert files["sha256"] == hashlib.sha256(lines.encode()).hexdigest()


def test_same_files_elsewhere_same_digest_changed_file_another(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_mnist_like(a / "MNIST" / "raw")
    write_mnist_like(b / "MNIST" / "raw")

    def digest(root: Path) -> str:
        dm = _datamodule("data=mnist", f"data.root={root}", "data.val_size=2")
        dm.setup("fit")
        return dm.describe()["files"]["sha256"]

    assert digest(a) == digest(b)
    labels = b / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10
    labels.write_bytes(bytes(data))
    assert digest(a) != digest(b)


def test_checksums_are_computed_once_and_cached(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    overrides = ("data=mnist", f"data.root={tmp_path}", "data.val_size=2")
    first = _datamodule(*overrides)
    first.setup()
    reads = []
    real = nfcv.data.files._inspect
    monkeypatch.setattr(nfcv.data.files, "_inspect", lambda p, d: reads.append(p) or real(p, d))
    second = _datamodule(*overrides)
    second.setup()
    assert reads == []  # every file from the cache
    assert second.describe()["files"] == first.describe()["files"]
    # a file rewritten (new size and time) is read again, and only that one
    labels = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    write_idx(labels, np.zeros(12))
    third = _datamodule(*overrides)
    third.setup("fit")
    assert reads == [labels]
    assert third.describe()["files"]["sha256"] != first.describe()["files"]["sha256"]


def test_checksum_false_records_no_files(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    dm = _datamodule(
        "data=mnist", f"data.root={tmp_path}", "data.val_size=2", "data.checksum=false"
    )
    dm.setup()
    assert dm.describe()["files"] is None


def test_digits_records_the_scikit_learn_file():
    files = _datamodule("data=digits").describe()["files"]
    assert files["count"] == 1 and files["list"][0]["path"] == "digits.csv.gz"


@pytest.mark.parametrize("option", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_data_config_takes_its_root_from_nfcv_data(option, monkeypatch, tmp_path):
    monkeypatch.setenv("NFCV_DATA", str(tmp_path / "shared"))
    data = OmegaConf.to_container(nfcv.compose([f"data={option}"]).data, resolve=True)
    if option == "digits":
        assert "root" not in data
        return
    assert str(data["root"]).startswith(str(tmp_path / "shared"))
    assert data["download"] is False  # offline by default
    assert data["num_bins"] == 2 ** data["num_bits"]
    for key in ("image_shape", "num_bins", "hflip", "checksum"):
        assert key in data, key
    monkeypatch.delenv("NFCV_DATA")
    data = OmegaConf.to_container(nfcv.compose([f"data={option}"]).data, resolve=True)
    assert str(data["root"]).startswith("data")


def test_model_takes_shape_and_levels_from_the_data_config():
    cfg = nfcv.compose(["data=celeba_hq", "model.levels=3"])
    assert list(cfg.model.image_shape) == [3, 256, 256] and cfg.model.num_bins == 32


def fashion_mnist_root() -> Path:
    """The real Fashion-MNIST files: ``$NFCV_DATA`` holding the original four .gz files (or
    torchvision's FashionMNIST/raw/ layout), as `data=fashion_mnist` reads them with no
    ``data.root``; CI exports it (.ci/run). Skips the test, naming NFCV_DATA, without them."""
    root = os.environ.get("NFCV_DATA")
    if not root:
        pytest.skip("NFCV_DATA is not set: point it at a folder of the 4 Fashion-MNIST .gz files")
    root = Path(root)
    flat = [root / f"{name}.gz" for name in MNIST_FILES]
    raw = [root / "FashionMNIST" / "raw" / name for name in MNIST_FILES]
    if not (all(f.is_file() for f in flat) or all(f.is_file() for f in raw)):
        pytest.skip(
            f"NFCV_DATA={root} does not hold the 4 Fashion-MNIST files ({', '.join(MNIST_FILES)}"
            ", .gz)"
        )
    return root


def test_real_fashion_mnist_files(tmp_path):
    root = fashion_mnist_root()
    dm = _datamodule("data=fashion_mnist", f"data.root={root}")
    dm.setup()
    assert [len(dm.split(s)) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert int(dm.split("test").images.max()) == 255
    files = dm.describe()["files"]
    assert files["count"] == 4
    for f in files["list"]:
        assert f["sha256"] == _sha256(root / f["path"])
