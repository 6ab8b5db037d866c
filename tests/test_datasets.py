"""Every dataset's loader on tiny files written in its real on-disk format: CIFAR-100 pickles,
SVHN .mat files, CelebA's folder and text files, CelebA-HQ image files, ImageNet npz batches and
an ImageFolder of PNGs. Each goes through the data module's setup and loaders and checks the
shapes, dtypes and values the model sees; missing and damaged files give the clear message; a
run records its data in the checkpoint and the eval JSON. (MNIST-family, CIFAR-10 and digits:
test_data.py.)"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

import nfcv
import nfcv.data
from nfcv.errors import DataError

RNG = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))


def _dm(*overrides: str):
    return instantiate(nfcv.compose(list(overrides)).data)


def _first_batches(dm) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One batch of each loader, as training, validation and test would see it."""
    return {
        "train": next(iter(dm.train_dataloader())),
        "val": next(iter(dm.val_dataloader())),
        "test": next(iter(dm.test_dataloader())),
    }


def _check_batches(dm, shape, num_bins) -> dict:
    batches = _first_batches(dm)
    for split, (x, y) in batches.items():
        assert x.dtype == torch.uint8, split
        assert tuple(x.shape[1:]) == tuple(shape), split
        assert int(x.min()) >= 0 and int(x.max()) <= num_bins - 1, split
        assert y.dtype == torch.int64, split
    return batches


# -- CIFAR-100


def write_cifar100(root: Path, n_train=10, n_test=4) -> dict[str, np.ndarray]:
    """CIFAR-100's python version: 'train' and 'test' pickles with 'fine_labels' and
    'coarse_labels', 'meta' with 'fine_label_names'."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = RNG.integers(0, 256, (n, 3072)).astype(np.uint8)
        fine = RNG.integers(0, 100, n).tolist()
        entry = {
            "filenames": [f"{i}.png" for i in range(n)],
            "batch_label": name,
            "fine_labels": fine,
            "coarse_labels": [f // 5 for f in fine],
            "data": data,
        }
        with open(base / name, "wb") as f:
            pickle.dump(entry, f)
        out[name], out[f"{name}_labels"] = data, np.array(fine)
    with open(base / "meta", "wb") as f:
        meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
        pickle.dump({**meta, "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return out


def test_cifar100_pickles(tmp_path):
    written = write_cifar100(tmp_path)
    dm = _dm(
        "data=cifar100",
        f"data.root={tmp_path}",
        "data.verify=false",
        "data.val_size=2",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    dm.setup()
    _check_batches(dm, (3, 32, 32), 256)
    test = dm.split("test")
    np.testing.assert_array_equal(test.images.numpy().reshape(4, -1), written["test"])
    np.testing.assert_array_equal(test.labels.numpy(), written["test_labels"])
    assert dm.num_classes == 100 and dm.split("train").hflip and not test.hflip
    assert dm.describe()["split_sizes"] == {"train": 8, "val": 2, "test": 4}


def test_cifar100_checks_torchvision_md5s_by_default(tmp_path):
    write_cifar100(tmp_path)
    dm = _dm("data=cifar100", f"data.root={tmp_path}", "data.val_size=2")
    with pytest.raises(DataError, match=r"cifar-100-python/train does not match"):
        dm.setup("fit")


# -- SVHN


def write_svhn(folder: Path, sizes=(("train", 9), ("test", 5))) -> dict[str, np.ndarray]:
    """SVHN's MATLAB files: 'X' (32, 32, 3, N) uint8 and 'y' (N, 1) with 10 for the digit 0."""
    from scipy.io import savemat

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for part, n in sizes:
        x = RNG.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = RNG.integers(1, 11, (n, 1)).astype(np.uint8)
        y[0, 0] = 10
        savemat(folder / f"{part}_32x32.mat", {"X": x, "y": y})
        out[part], out[f"{part}_labels"] = x, y[:, 0].astype(np.int64) % 10
    return out


def test_svhn_mat_files(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    dm = _dm(
        "data=svhn",
        f"data.root={tmp_path}",
        "data.verify=false",
        "data.val_size=3",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    dm.setup()
    _check_batches(dm, (3, 32, 32), 256)
    test = dm.split("test")
    # (H, W, C, N) in the file -> (N, C, H, W)
    np.testing.assert_array_equal(test.images.numpy(), written["test"].transpose(3, 2, 0, 1))
    np.testing.assert_array_equal(test.labels.numpy(), written["test_labels"])
    assert int(test.labels[0]) == 0  # label 10 is the digit 0
    assert not dm.split("train").hflip  # digits are not mirror-symmetric
    assert dm.describe()["files"]["count"] == 2


def test_svhn_extra_joins_training(tmp_path):
    write_svhn(tmp_path / "svhn", (("train", 6), ("test", 2), ("extra", 4)))
    dm = _dm(
        "data=svhn",
        f"data.root={tmp_path}",
        "data.verify=false",
        "data.extra=true",
        "data.val_size=2",
    )
    dm.setup()
    assert len(dm.split("train")) + len(dm.split("val")) == 10
    assert dm.describe()["preprocessing"]["extra_in_train"] is True


def test_svhn_verifies_and_names_damaged_files(tmp_path):
    write_svhn(tmp_path / "svhn")
    with pytest.raises(DataError, match=r"train_32x32.mat does not match torchvision's MD5"):
        _dm("data=svhn", f"data.root={tmp_path}").setup("fit")
    bad = tmp_path / "svhn" / "train_32x32.mat"
    bad.write_bytes(bad.read_bytes()[:2000])
    dm = _dm("data=svhn", f"data.root={tmp_path}", "data.verify=false")
    with pytest.raises(DataError, match=rf"cannot read {bad} .*truncated or corrupt"):
        dm.setup("fit")


# -- CelebA


CELEBA_ATTRS = [f"Attr_{i}" for i in range(40)]


def write_celeba(root: Path, parts=(0, 0, 0, 0, 1, 1, 2, 2)) -> list[Path]:
    """CelebA as torchvision reads it: ROOT/celeba/img_align_celeba/NNNNNN.jpg (178 x 218 JPEGs)
    and the five text files: the partition (0 train, 1 valid, 2 test), identities, and bounding
    boxes, landmarks and the 40 attributes, each with a count line and a header line."""
    base = root / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    paths = []
    for name in names:
        # smooth content so the JPEG stays close to it; the tests compare against the decode
        yy, xx = np.mgrid[0:218, 0:178]
        base_color = RNG.integers(0, 256, 3)
        img = (base_color + 0.5 * xx[..., None] + 0.3 * yy[..., None]) % 256
        Image.fromarray(img.astype(np.uint8)).save(images / name, quality=95)
        paths.append(images / name)
    n = len(names)
    lines = {
        "list_eval_partition.txt": [f"{m} {p}" for m, p in zip(names, parts, strict=True)],
        "identity_CelebA.txt": [f"{m} {i % 3 + 1}" for i, m in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"]
        + [f"{m}    95  71 226 313" for m in names],
        "list_landmarks_align_celeba.txt": [
            str(n),
            "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
            "rightmouth_x rightmouth_y",
        ]
        + [f"{m} 69 109 106 113 77 142 73 152 108 154" for m in names],
        "list_attr_celeba.txt": [str(n), " ".join(CELEBA_ATTRS)]
        + [f"{m} " + " ".join(["-1", " 1"] * 20) for m in names],
    }
    for fname, rows in lines.items():
        (base / fname).write_text("\n".join(rows) + "\n")
    return paths


def _decoded(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_celeba_official_splits_centre_crop(tmp_path):
    paths = write_celeba(tmp_path)
    dm = _dm(
        "data=celeba",
        f"data.root={tmp_path}",
        "data.verify=false",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    dm.setup()
    assert dm.describe()["split_sizes"] == {"train": 4, "val": 2, "test": 2}
    batches = _check_batches(dm, (3, 64, 64), 256)
    assert (batches["test"][1] == -1).all()  # CelebA has no class labels
    assert dm.split("train").hflip and not dm.split("val").hflip
    # at the full width (178 x 178) the centre crop is exact: rows 20..197 of 218
    dm = _dm(
        "data=celeba", f"data.root={tmp_path}", "data.verify=false", "data.image_shape=[3,178,178]"
    )
    test = dm.split("test")
    np.testing.assert_array_equal(
        test.images[0].numpy().transpose(1, 2, 0), _decoded(paths[6])[20:198]
    )
    files = dm.describe()["files"]
    assert files["count"] == 5 + len(paths)


def test_celeba64_is_realnvps_crop(tmp_path):
    paths = write_celeba(tmp_path)
    common = ("data=celeba64", f"data.root={tmp_path}", "data.verify=false")
    dm = _dm(*common, "data.batch_size=2", "data.num_workers=0")
    _check_batches(dm, (3, 64, 64), 256)
    record = dm.describe()["preprocessing"]
    assert record["crop_top_left_height_width"] == [40, 15, 148, 148]
    assert record["resize_to"] == [64, 64] and record["hflip_train"] is True
    # without the resize, exactly image[40:188, 15:163] (real_nvp_multiscale_dataset.py)
    crop = _dm(*common, "data.image_shape=[3,148,148]").split("val")
    np.testing.assert_array_equal(
        crop.images[1].numpy().transpose(1, 2, 0), _decoded(paths[5])[40:188, 15:163]
    )


def test_celeba_flips_only_training_images(tmp_path):
    write_celeba(tmp_path)
    dm = _dm("data=celeba64", f"data.root={tmp_path}", "data.verify=false")
    dm.setup()
    train, val = dm.split("train"), dm.split("val")
    plain = train.images[0]
    seen = {bytes(train[0][0].numpy()) for _ in range(40)}
    assert seen == {bytes(plain.numpy()), bytes(plain.flip(-1).numpy())}
    assert {bytes(val[0][0].numpy()) for _ in range(20)} == {bytes(val.images[0].numpy())}


def test_celeba_damaged_files_fail_at_setup_by_name(tmp_path):
    paths = write_celeba(tmp_path)
    with pytest.raises(DataError, match=r"list_attr_celeba.txt does not match torchvision's MD5"):
        _dm("data=celeba", f"data.root={tmp_path}").setup("fit")
    bad = paths[7]  # a test image: must fail before training, at the fit setup
    bad.write_bytes(bad.read_bytes()[:600])
    with pytest.raises(DataError, match=rf"cannot decode image {bad}.*truncated or corrupt"):
        _dm("data=celeba", f"data.root={tmp_path}", "data.verify=false").setup("fit")


def test_celeba_image_too_small_for_the_crop_fails_at_setup(tmp_path):
    paths = write_celeba(tmp_path)
    Image.new("RGB", (120, 150)).save(paths[3])
    dm = _dm("data=celeba64", f"data.root={tmp_path}", "data.verify=false")
    with pytest.raises(DataError, match=rf"cannot preprocess {paths[3]}: the crop"):
        dm.setup("fit")


# -- CelebA-HQ


def write_celeba_hq(folder: Path, n=12, side=64, suffix=".png") -> list[np.ndarray]:
    """CelebA-HQ as one image file per face named by index (0.png ... n-1.png)."""
    folder.mkdir(parents=True)
    images = []
    for i in range(n):
        img = RNG.integers(0, 256, (side, side, 3)).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}{suffix}")
        images.append(img)
    return images


def test_celeba_hq_box_downsampled_5_bits_index_order(tmp_path):
    images = write_celeba_hq(tmp_path / "celeba_hq")
    dm = _dm(
        "data=celeba_hq",
        f"data.root={tmp_path}",
        "data.image_shape=[3,16,16]",
        "data.test_size=3",
        "data.val_size=2",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
    )
    assert dm.num_bins == 32
    _check_batches(dm, (3, 16, 16), 32)
    test = dm.split("test")
    # the last 3 in numeric order (9, 10, 11: not "10" < "9" as text); 4 x 4 block means, rounded
    for got, src in zip(test.images, images[9:], strict=True):
        want = np.rint(src.reshape(16, 4, 16, 4, 3).astype(np.float64).mean((1, 3)))
        np.testing.assert_array_equal(got.numpy(), (want.astype(np.uint8) >> 3).transpose(2, 0, 1))
    assert not dm.split("train").hflip and len(dm.split("train")) == 7
    record = dm.describe()
    assert (
        record["preprocessing"]["resample"] == "box" and record["preprocessing"]["num_bits"] == 5
    )


def test_box_downsampling_matches_karras_halving():
    """dataset_tool averages 2 x 2 blocks in float32 twice (1024 -> 512 -> 256) and rounds once."""
    arr = RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)
    img = arr.astype(np.float32)
    for _ in range(2):
        img = (img[0::2, 0::2] + img[0::2, 1::2] + img[1::2, 0::2] + img[1::2, 1::2]) * 0.25
    want = np.rint(img).clip(0, 255).astype(np.uint8)
    np.testing.assert_array_equal(nfcv.data.images._box_downsample(arr, 16, 16), want)


def test_celeba_hq_wrong_sized_image_fails_at_setup(tmp_path):
    write_celeba_hq(tmp_path / "celeba_hq", n=6)
    Image.new("RGB", (60, 60)).save(tmp_path / "celeba_hq" / "5.png")
    dm = _dm(
        "data=celeba_hq",
        f"data.root={tmp_path}",
        "data.image_shape=[3,16,16]",
        "data.test_size=2",
        "data.val_size=1",
    )
    with pytest.raises(DataError, match=r"5.png: box resampling needs"):
        dm.setup("fit")


# -- ImageNet 32 / 64


def write_imagenet(folder: Path, side=32, per_batch=3, n_val=4, compressed=False) -> dict:
    """image-net.org's npz batches: train_data_batch_1..10.npz ('data', 'labels', 'mean') and
    val_data.npz; 'data' rows of 3*side*side uint8 (R plane, G, B), labels 1..1000."""
    folder.mkdir(parents=True)
    save = np.savez_compressed if compressed else np.savez
    out = {"train": [], "train_labels": []}
    for i in range(1, 11):
        x = RNG.integers(0, 256, (per_batch, 3, side, side)).astype(np.uint8)
        y = RNG.integers(1, 1001, per_batch).tolist()
        save(
            folder / f"train_data_batch_{i}.npz",
            data=x.reshape(per_batch, -1),
            labels=y,
            mean=x.reshape(per_batch, -1).mean(0),
        )
        out["train"].append(x)
        out["train_labels"] += y
    x = RNG.integers(0, 256, (n_val, 3, side, side)).astype(np.uint8)
    y = RNG.integers(1, 1001, n_val).tolist()
    y[0] = 1000
    save(folder / "val_data.npz", data=x.reshape(n_val, -1), labels=y)
    out["train"] = np.concatenate(out["train"])
    out["test"], out["test_labels"] = x, np.array(y)
    return out


@pytest.mark.parametrize("compressed", [False, True])
def test_imagenet32_npz_batches_read_row_by_row(tmp_path, compressed):
    written = write_imagenet(tmp_path / "imagenet32", compressed=compressed)
    overrides = (
        "data=imagenet32",
        f"data.root={tmp_path}",
        "data.val_size=5",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.num_workers=0",
    )
    dm = _dm(*overrides)
    dm.setup()
    _check_batches(dm, (3, 32, 32), 256)
    test = dm.split("test")
    np.testing.assert_array_equal(test.images.numpy(), written["test"])
    np.testing.assert_array_equal(test.labels.numpy(), written["test_labels"] - 1)  # 0-based
    assert int(test.labels[0]) == 999
    train, val = dm.split("train"), dm.split("val")
    assert (len(train), len(val)) == (25, 5)
    seen = np.concatenate([train.images.numpy(), val.images.numpy()])
    assert sorted(map(bytes, seen)) == sorted(map(bytes, written["train"]))
    # read row by row from the converted copy under $NFCV_CACHE, never whole in memory
    assert isinstance(train.source, nfcv.data.NpyImages)
    np.testing.assert_array_equal(train.source.array[train.indices[0]], train.images[0])
    assert str(train.source.path).startswith(str(tmp_path / "cache" / "arrays"))
    # pickled for DataLoader workers without the array
    assert len(pickle.dumps(train)) < 4000
    assert not train.hflip and dm.num_classes == 1000
    assert dm.describe()["files"]["count"] == 11


def test_imagenet_converts_once(tmp_path, monkeypatch):
    write_imagenet(tmp_path / "imagenet32")
    _dm("data=imagenet32", f"data.root={tmp_path}", "data.val_size=5").setup()

    def refuse(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(nfcv.data.ImageNetDataModule, "_convert", refuse)
    again = _dm("data=imagenet32", f"data.root={tmp_path}", "data.val_size=5")
    again.setup()
    assert len(again.split("test")) == 4


def test_imagenet_truncated_batch_names_the_file(tmp_path):
    write_imagenet(tmp_path / "imagenet32")
    bad = tmp_path / "imagenet32" / "train_data_batch_7.npz"
    bad.write_bytes(bad.read_bytes()[:5000])
    with pytest.raises(DataError, match=rf"cannot read {bad} .*truncated"):
        _dm("data=imagenet32", f"data.root={tmp_path}", "data.val_size=5").setup("fit")
    assert not list((tmp_path / "cache" / "arrays").glob("*/manifest.json"))


def test_imagenet64_config_on_32_pixel_files_says_which(tmp_path):
    write_imagenet(tmp_path / "imagenet64")  # 32 x 32 rows in the 64 x 64 folder
    with pytest.raises(DataError, match=r"needs uint8 rows of 12288 values.*imagenet32"):
        _dm("data=imagenet64", f"data.root={tmp_path}", "data.val_size=5").setup("fit")


def test_imagenet64_reads_64_pixel_rows(tmp_path):
    written = write_imagenet(tmp_path / "imagenet64", side=64, per_batch=2, n_val=2)
    dm = _dm("data=imagenet64", f"data.root={tmp_path}", "data.val_size=4")
    np.testing.assert_array_equal(dm.split("test").images.numpy(), written["test"])


# -- A folder of images


def write_folder(root: Path, sizes=((40, 30), (30, 50), (16, 20), (64, 64), (20, 16))) -> dict:
    """torchvision's ImageFolder layout: ROOT/<class>/<name>.png, PNGs of various sizes (w, h)."""
    out = {}
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            img = RNG.integers(0, 256, (h, w, 3)).astype(np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(img).save(path)
            out[path] = (img, c)
    return out


def test_folder_resized_and_centre_cropped(tmp_path):
    written = write_folder(tmp_path / "imgs")
    dm = _dm(
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_shape=[3,16,16]",
        "data.test_size=3",
        "data.val_size=2",
        "data.batch_size=4",
        "data.num_workers=0",
    )
    dm.setup()
    _check_batches(dm, (3, 16, 16), 256)
    assert dm.describe()["split_sizes"] == {"train": 5, "val": 2, "test": 3}
    assert dm.num_classes == 2 and dm.describe()["num_classes"] == 2
    # every image once over the three splits, with its class folder as label
    labels = torch.cat([dm.split(s).labels for s in ("train", "val", "test")])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5
    # a 16 x 20 (w x h) image needs no scaling: its centre 16 rows, exactly
    test_dm = _dm(
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_shape=[3,16,16]",
        "data.test_root=" + str(tmp_path / "imgs"),
    )
    test = test_dm.split("test")
    i = [p.name for p in map(Path, test.source.paths)].index("2.png")
    src, _ = written[tmp_path / "imgs" / "cat" / "2.png"]
    np.testing.assert_array_equal(test.images[i].numpy().transpose(1, 2, 0), src[2:18])


def test_folder_grayscale(tmp_path):
    write_folder(tmp_path / "imgs")
    dm = _dm(
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_shape=[1,8,8]",
        "data.test_size=2",
        "data.val_size=2",
        "data.batch_size=2",
        "data.num_workers=0",
    )
    _check_batches(dm, (1, 8, 8), 256)


def test_folder_corrupt_image_and_empty_folder(tmp_path):
    written = write_folder(tmp_path / "imgs")
    bad = next(iter(written))
    bad.write_bytes(bad.read_bytes()[:100])
    dm = _dm(
        "data=folder",
        f"data.root={tmp_path / 'imgs'}",
        "data.image_shape=[3,16,16]",
        "data.test_size=2",
        "data.val_size=2",
    )
    with pytest.raises(DataError, match=rf"cannot decode image {bad}"):
        dm.setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder files not found.*<class>/<image>"):
        _dm("data=folder", f"data.root={tmp_path / 'empty'}").setup("fit")


# -- every dataset: missing files give the one clear message


LOCAL = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte",
    "fashion_mnist": "FashionMNIST/raw/train-images-idx3-ubyte",
    "cifar10": "cifar-10-batches-py/data_batch_1",
    "cifar100": "cifar-100-python/train",
    "svhn": "svhn/train_32x32.mat",
    "celeba": "celeba/list_attr_celeba.txt",
    "celeba64": "celeba/list_attr_celeba.txt",
    "celeba_hq": "celeba_hq",
    "imagenet32": "imagenet32/train_data_batch_1.npz",
    "imagenet64": "imagenet64/train_data_batch_1.npz",
}


@pytest.mark.parametrize("name", sorted(LOCAL))
def test_missing_files_name_paths_and_the_fetch_command(tmp_path, name):
    dm = _dm(f"data={name}", f"data.root={tmp_path}")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert f"{name} files not found under {tmp_path}" in message
    assert str(tmp_path / LOCAL[name]) in message
    assert f"python scripts/prepare_data.py {name} {tmp_path}" in message
    assert "data.root" in message and "NFCV_DATA" in message
    if name in ("celeba_hq", "imagenet32", "imagenet64"):
        assert "cannot be downloaded automatically" in message
    else:
        assert "data.download=true" in message


def test_a_damaged_file_stops_nfcv_train_with_exit_2(tmp_path):
    from test_cli import _fails, run

    write_imagenet(tmp_path / "imagenet32")
    bad = tmp_path / "imagenet32" / "val_data.npz"
    bad.write_bytes(bad.read_bytes()[:3000])
    proc = run(
        "nfcv-train",
        "data=imagenet32",
        f"data.root={tmp_path}",
        "data.val_size=5",
        cwd=tmp_path,
        check=False,
    )
    _fails(proc, f"cannot read {bad}", "truncated")


# -- the record in the checkpoint and the eval JSON


def test_checkpoint_and_eval_json_record_the_same_data(tmp_path, tiny):
    from test_data import write_cifar10

    from nfcv.cli.eval import evaluate_checkpoint
    from nfcv.training.run import train

    write_cifar10(tmp_path / "data", per_batch=5, n_test=3)
    overrides = tiny(
        **{
            "data.root": str(tmp_path / "data"),
            "data.verify": "false",
            "data.val_size": "5",
            "data.num_workers": "0",
            "sample.reconstructions": "2",
        }
    )
    summary = train(nfcv.compose(["data=cifar10", *overrides]), run_dir=tmp_path / "run")
    ckpt = Path(summary["last_ckpt"])
    info = torch.load(ckpt, weights_only=True)["hyper_parameters"]["data_info"]
    assert info["name"] == "cifar10" and info["image_shape"] == [3, 32, 32]
    assert info["num_bins"] == 256 and info["split_sizes"] == {"train": 20, "val": 5, "test": 3}
    assert info["preprocessing"]["hflip_train"] is True
    assert info["preprocessing"]["md5_checked"] is False  # verify=false
    assert info["files"]["count"] == 7 and len(info["files"]["sha256"]) == 64
    record, _ = evaluate_checkpoint(
        nfcv.compose([f"ckpt={ckpt}", "progress=false"], config_name="eval"), ckpt, "run"
    )
    assert record["data"]["files"]["sha256"] == info["files"]["sha256"]
    assert record["same_files_as_training"] is True
    assert record["data"]["split_sizes"]["test"] == 3
    json.dumps(record["data"])  # plain containers


# -- long runs


@pytest.mark.slow
def test_real_fashion_mnist_trains_end_to_end(tmp_path, tiny):
    from test_data import fashion_mnist_root

    from nfcv.training.run import train

    overrides = tiny(
        **{
            "data.root": str(fashion_mnist_root()),  # $NFCV_DATA, or the test skips
            "model.hidden": "32",
            "model.steps": "2",
            "trainer.max_steps": "150",
            "trainer.val_check_interval": "75",
            "trainer.limit_val_batches": "2",
            "sample.every_n_steps": "75",
            "data.batch_size": "32",
        }
    )
    summary = train(nfcv.compose(["data=fashion_mnist", *overrides]), run_dir=tmp_path / "run")
    # The uniform density over 256 levels scores 8 bits per dim (per-pixel histograms 4.59);
    # these 150 steps of a width-32 Glow reached 6.44 when this test was written.
    assert summary["test_bpd"] < 7.0, summary["test_bpd"]
    info = torch.load(summary["last_ckpt"], weights_only=True)["hyper_parameters"]["data_info"]
    sizes = {"train": 55000, "val": 5000, "test": 10000}
    assert info["split_sizes"] == sizes and info["files"]["count"] == 4


def _rss_kib() -> int:
    """The resident set (VmRSS): anonymous memory and mapped file pages alike."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _PeakRSS:
    """The peak growth of the process's resident set (KiB) while the block runs, sampled every
    2 ms by a thread."""

    def __enter__(self):
        import threading

        self.base, self.peak, self._stop = _rss_kib(), 0, threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_kib() - self.base)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib() - self.base)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_imagenet_memory_stays_flat(tmp_path):
    """Converting the npz batches and a pass over every training image keep the process's
    resident set far below the size of the images (200 MB here)."""
    per_batch = 6500  # 10 batches of 6,500 images of 3 x 32 x 32: 200 MB
    folder = tmp_path / "imagenet32"
    folder.mkdir()
    for i in range(1, 11):
        data = np.full((per_batch, 3072), i, dtype=np.uint8)
        np.savez(folder / f"train_data_batch_{i}.npz", data=data, labels=np.ones(per_batch, int))
        del data
    zeros = np.zeros((100, 3072), np.uint8)
    np.savez(folder / "val_data.npz", data=zeros, labels=np.ones(100, int))
    dm = _dm(
        "data=imagenet32", f"data.root={tmp_path}", "data.batch_size=500", "data.num_workers=0"
    )
    with _PeakRSS() as setup:
        dm.setup("fit")  # conversion, sha256 of the batches
    total = 0
    with _PeakRSS() as epoch:
        for x, _ in dm.train_dataloader():
            total += int(x.shape[0])
    assert total == (10 * per_batch - 10000) // 500 * 500
    assert setup.peak < 64 * 1024, f"setup: +{setup.peak / 1024:.0f} MiB for 200 MB of images"
    assert epoch.peak < 64 * 1024, f"epoch: +{epoch.peak / 1024:.0f} MiB for 200 MB of images"
