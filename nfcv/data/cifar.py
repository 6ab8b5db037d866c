"""CIFAR-10 and CIFAR-100 from their python pickle batches."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nfcv.data.base import LocalDataModule, torchvision_datasets
from nfcv.errors import DataError

# -- CIFAR-10 and CIFAR-100: python pickle batches


class CIFAR10DataModule(LocalDataModule):
    """CIFAR-10 (Krizhevsky 2009) python pickle batches via torchvision
    (``ROOT/cifar-10-batches-py``): 50,000 training and 10,000 test images, 32 x 32.

    `verify` checks the batch files against torchvision's MD5s (set it false for re-packed or
    test files); the files are always parsed by torchvision's own reader.
    """

    name = "cifar10"
    tv_name = "CIFAR10"
    num_classes = 10
    lists_md5s = True

    @property
    def tv_class(self):
        return getattr(torchvision_datasets(), self.tv_name)

    @property
    def folder(self) -> str:  # type: ignore[override]
        return self.tv_class.base_folder

    def _listed(self) -> dict[Path, str]:
        tv = self.tv_class
        rows = [*tv.train_list, *tv.test_list, [tv.meta["filename"], tv.meta["md5"]]]
        return {self.data_dir / name: md5 for name, md5 in rows}

    def expected(self) -> str:
        names = [p.name for p in self._listed()]
        return f"{', '.join(names)} in {self.data_dir}"

    def source_files(self) -> list[Path]:
        return list(self._listed())

    def _ensure(self) -> None:
        listed = list(self._listed())
        if self.download and not all(p.is_file() for p in listed):
            try:
                self.tv_class(str(self.root), train=True, download=True)
            except (RuntimeError, OSError) as err:
                raise self._download_failed(err) from err
        self._require(listed)
        self._verify_md5(self._listed())

    def _find_bad_batch(self, files: Iterable[Path]) -> Path | None:
        for path in files:
            try:
                with open(path, "rb") as f:
                    entry = pickle.load(f, encoding="latin1")
                if "data" in entry and np.asarray(entry["data"]).shape[1:] != (3072,):
                    return path
            except Exception:
                return path
        return None

    def check_sources(self) -> None:
        # With verify, the MD5s covered every file; without, unpickle each (a second or two).
        if not self.verify and not self._verified:
            bad = self._find_bad_batch(self._listed())
            if bad is not None:
                raise DataError(
                    f"cannot read {bad}: the file is truncated or corrupt. Fetch it again "
                    f"(`{self.fetch_command()}`)"
                )
            self._verified = True

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            raise DataError(f"{self.name} has no official validation split: set data.val_size")
        self._ensure()
        tv = self.tv_class

        class _Checked(tv):
            # The files were checked above (present; MD5s where verify is on).
            def _check_integrity(self) -> bool:
                return True

            def _load_meta(self) -> None:
                with open(Path(self.root) / self.base_folder / self.meta["filename"], "rb") as f:
                    meta = pickle.load(f, encoding="latin1")
                self.classes = meta[self.meta["key"]]
                self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        try:
            ds = _Checked(str(self.root), train=split == "train", download=False)
        except Exception as err:  # pickle, EOF, key and shape errors of a damaged batch
            names = tv.train_list if split == "train" else tv.test_list
            files = [self.data_dir / n for n, _ in names] + [self.data_dir / tv.meta["filename"]]
            bad = self._find_bad_batch(files)
            where = str(bad) if bad is not None else f"one of {', '.join(map(str, files))}"
            raise DataError(
                f"cannot read {where} ({type(err).__name__}: {err}): the file is truncated or "
                f"corrupt. Fetch it again (`{self.fetch_command()}`)"
            ) from err
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (Krizhevsky 2009) via torchvision (``ROOT/cifar-100-python``): 50,000 training
    and 10,000 test images, 32 x 32, 100 fine labels."""

    name = "cifar100"
    tv_name = "CIFAR100"
    num_classes = 100


# -- SVHN: MATLAB files
