"""Lightning data modules. Every dataset yields ``(image, label)`` with the image an integer tensor
of shape (C, H, W) and values in [0, num_bins - 1]; dequantization happens in the model."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from nfcv.errors import DataError


class ImageTensorDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, with labels; optional horizontal flips."""

    def __init__(self, images: Tensor, labels: Tensor, hflip: bool = False):
        self.images = images
        self.labels = labels
        self.hflip = hflip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i]
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]


def _reduce_bits(images: Tensor, num_bits: int) -> Tensor:
    """8-bit images to `num_bits` bits by dropping low bits (Glow's 5-bit CelebA-HQ)."""
    if not 1 <= num_bits <= 8:
        raise DataError(f"data.num_bits must be in 1..8, got {num_bits}")
    return images >> (8 - num_bits) if num_bits < 8 else images


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses implement `load_split(train)` returning (images uint8/int, labels).

    The validation split is carved from the training split with a fixed seed (`split_seed`), so
    every run of a config sees the same three splits.
    """

    name = "images"

    def __init__(
        self,
        image_shape: Sequence[int],
        num_bins: int,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_size: int = 1000,
        split_seed: int = 0,
        num_workers: int = 0,
        hflip: bool = False,
        name: str | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_bins = int(num_bins)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_size = int(val_size)
        self.split_seed = int(split_seed)
        self.num_workers = int(num_workers)
        self.hflip = bool(hflip)
        if name is not None:
            self.name = name
        self.train_set: ImageTensorDataset | None = None
        self.val_set: ImageTensorDataset | None = None
        self.test_set: ImageTensorDataset | None = None

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def _checked(self, images: Tensor, split: str) -> Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(
                f"{self.name} {split} images have shape {tuple(images.shape[1:])} but the config "
                f"says data.image_shape={list(self.image_shape)}; fix data.image_shape"
            )
        hi = int(images.max())
        if images.min() < 0 or hi > self.num_bins - 1:
            raise DataError(
                f"{self.name} {split} pixel values reach {hi} but data.num_bins={self.num_bins} "
                f"allows at most {self.num_bins - 1}; fix data.num_bins / data.num_bits"
            )
        return images

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self.load_split(train=True)
            images = self._checked(images, "train")
            n = images.shape[0]
            if not 0 < self.val_size < n:
                raise DataError(
                    f"data.val_size={self.val_size} must be between 1 and {n - 1} "
                    f"(the {self.name} training split has {n} images)"
                )
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self.train_set = ImageTensorDataset(images[train_idx], labels[train_idx], self.hflip)
            self.val_set = ImageTensorDataset(images[val_idx], labels[val_idx])
        if stage in (None, "test") and self.test_set is None:
            images, labels = self.load_split(train=False)
            self.test_set = ImageTensorDataset(self._checked(images, "test"), labels)

    def split(self, name: str) -> ImageTensorDataset:
        """The dataset of split `name` ('train', 'val' or 'test'), set up on demand."""
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split '{name}': use train, val or test")
        self.setup("test" if name == "test" else "fit")
        return getattr(self, f"{name}_set")

    def describe(self) -> dict:
        """What a run saw, recorded in checkpoints and eval JSON."""
        sizes = {
            s: len(getattr(self, f"{s}_set"))
            for s in ("train", "val", "test")
            if getattr(self, f"{s}_set") is not None
        }
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "num_bins": self.num_bins,
            "split_sizes": sizes,
        }

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def eval_loader(self, name: str) -> DataLoader:
        """Split `name` in order, `eval_batch_size` at a time (what nfcv-eval iterates)."""
        return self._loader(self.split(name), self.eval_batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.split("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_loader("test")


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16: 17 levels).

    Shipped inside scikit-learn, so it needs no download: the default dataset. There is no official
    test split; `test_size` images are held out with a fixed permutation (`split_seed`).
    """

    name = "digits"

    def __init__(self, test_size: int = 297, **kwargs):
        super().__init__(**kwargs)
        self.test_size = int(test_size)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        n = images.shape[0]
        if not 0 < self.test_size < n:
            raise DataError(f"data.test_size must be between 1 and {n - 1}, got {self.test_size}")
        # A seed distinct from the val split's, so test and val are independent draws.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed + 1))
        idx = perm[self.test_size :] if train else perm[: self.test_size]
        return images[idx], labels[idx]


def _default_cache() -> Path:
    return Path(os.environ.get("NFCV_CACHE", Path.home() / ".cache" / "nfcv"))


class _TorchvisionModule(ImageDataModule):
    """Shared handling of `root`, `download` and missing files for torchvision datasets."""

    how_to_get = ""

    def __init__(self, root: str, download: bool = False, num_bits: int = 8, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = bool(download)
        self.num_bits = int(num_bits)

    def _missing(self, err: Exception, expected: str) -> DataError:
        return DataError(
            f"{self.name} files not found under {self.root} (expected {expected}). "
            f"Fix: pass data.download=true on a machine with internet, or point data.root (or the "
            f"NFCV_DATA environment variable) at a folder that holds them{self.how_to_get} "
            f"[torchvision: {err}]"
        )


class _MNISTLike(_TorchvisionModule):
    """MNIST-family IDX files via torchvision. Accepts torchvision's layout
    (``ROOT/<Class>/raw/*-ubyte[.gz]``) or the original distribution's flat folder of ``.gz``
    files (as in Debian's dataset packages), which is staged once into torchvision's layout."""

    tv_class: type

    def _flat_files(self) -> list[Path] | None:
        names = [Path(url).name for url, _ in self.tv_class.resources]
        files = [self.root / n for n in names]
        if all(f.is_file() for f in files):
            return files
        plain = [self.root / n.removesuffix(".gz") for n in names]
        return plain if all(f.is_file() for f in plain) else None

    def _stage(self, files: list[Path]) -> Path:
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        staged = _default_cache() / "staged" / key
        raw = staged / self.tv_class.__name__ / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in files:
            target = raw / f.name.removesuffix(".gz")
            if target.is_file() and target.stat().st_mtime >= f.stat().st_mtime:
                continue
            tmp = target.with_suffix(".tmp")
            opener = gzip.open if f.suffix == ".gz" else open
            try:
                with opener(f, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as err:
                raise DataError(
                    f"cannot read {f}: {err}; the file is truncated or corrupt"
                ) from err
            tmp.replace(target)
        return staged

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        root = self.root
        layout = root / self.tv_class.__name__ / "raw"
        if not layout.is_dir() and not self.download:
            flat = self._flat_files()
            if flat is not None:
                root = self._stage(flat)
        try:
            ds = self.tv_class(str(root), train=train, download=self.download)
        except (RuntimeError, OSError) as err:  # OSError: a download without internet
            expected = (
                f"{layout}/train-images-idx3-ubyte and the other IDX files, "
                f"or the original .gz files in {self.root}"
            )
            raise self._missing(err, expected) from err
        images = _reduce_bits(ds.data.unsqueeze(1).to(torch.uint8), self.num_bits)
        return images, ds.targets.to(torch.int64)


def _tv():
    import torchvision.datasets as tvd

    return tvd


class MNISTDataModule(_MNISTLike):
    name = "mnist"

    @property
    def tv_class(self):
        return _tv().MNIST


class FashionMNISTDataModule(_MNISTLike):
    name = "fashion_mnist"
    how_to_get = " (the original Fashion-MNIST .gz files, e.g. Debian's dataset-fashion-mnist)"

    @property
    def tv_class(self):
        return _tv().FashionMNIST


class CIFAR10DataModule(_TorchvisionModule):
    """CIFAR-10 python pickle batches via torchvision (``ROOT/cifar-10-batches-py``).

    `verify=false` skips torchvision's MD5 check of the batch files (for re-packed or test files);
    the files are still parsed by torchvision's own reader.
    """

    name = "cifar10"

    def __init__(self, verify: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.verify = bool(verify)

    def load_split(self, train: bool) -> tuple[Tensor, Tensor]:
        tvd = _tv()
        verify = self.verify

        class _CIFAR10(tvd.CIFAR10):
            def _check_integrity(self) -> bool:
                if verify:
                    return super()._check_integrity()
                base = Path(self.root) / self.base_folder
                return all((base / n).is_file() for n, _ in self.train_list + self.test_list)

            def _load_meta(self) -> None:
                if verify:
                    return super()._load_meta()
                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    meta = pickle.load(f, encoding="latin1")
                self.classes = meta[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        try:
            ds = _CIFAR10(str(self.root), train=train, download=self.download)
        except (RuntimeError, OSError, pickle.UnpicklingError, EOFError) as err:
            raise self._missing(
                err, f"{self.root}/cifar-10-batches-py/data_batch_1..5, test_batch"
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return _reduce_bits(images, self.num_bits), torch.as_tensor(ds.targets, dtype=torch.int64)
