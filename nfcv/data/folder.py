"""Any image folder in torchvision's ImageFolder layout."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from nfcv.data.base import LocalDataModule, torchvision_datasets
from nfcv.data.images import ImageFiles, ImagePreprocess, ImageSource
from nfcv.errors import DataError


class FolderDataModule(LocalDataModule):
    """Any folder of images in torchvision's `ImageFolder` layout (``ROOT/<class>/<image>``; the
    class folders give the labels). Each image is scaled to cover `image_shape` and centre-cropped
    to it (``Resize`` + ``CenterCrop``; grayscale for 1 channel). The test split is the folder
    `test_root` (same layout) if given, else `test_size` images drawn with seed split_seed + 1.
    """

    name = "folder"
    can_download = False
    how_to_get = ": one subfolder per class (a single subfolder for unlabelled images)"

    def __init__(self, test_root: str | None = None, test_size: int = 1000, **kwargs):
        super().__init__(**kwargs)
        self.test_root = Path(os.path.expanduser(str(test_root))) if test_root else None
        self.test_size = int(test_size)
        self._listing: dict[Path, tuple[list[Path], Tensor, int]] = {}

    def fetch_command(self) -> str:
        return f"python scripts/prepare_data.py folder {self.root}"

    def expected(self) -> str:
        return f"{self.root}/<class>/<image>.png (or .jpg, ...)"

    def _list(self, root: Path) -> tuple[list[Path], Tensor, int]:
        if root not in self._listing:
            if not root.is_dir():
                raise self.missing_error([root], self.expected())
            try:
                found = torchvision_datasets().ImageFolder(str(root))
            except FileNotFoundError as err:
                raise self.missing_error([root / "<class>"], self.expected(), str(err)) from err
            paths = [Path(p) for p, _ in found.samples]
            labels = torch.tensor([c for _, c in found.samples], dtype=torch.int64)
            self._listing[root] = (paths, labels, len(found.classes))
        return self._listing[root]

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        return self._listing[self.root][2] if self.root in self._listing else None

    def source_files(self) -> list[Path]:
        paths = list(self._list(self.root)[0])
        if self.test_root is not None:
            paths += self._list(self.test_root)[0]
        return paths

    def load_split(self, split: str) -> ImageSource:
        if split == "val":
            raise DataError("folder has no validation folder: set data.val_size")
        paths, labels, _ = self._list(self.root)
        preprocess = self.image_preprocess()
        if self.test_root is not None:
            if split == "test":
                paths, labels, _ = self._list(self.test_root)
            return ImageFiles(paths, labels, preprocess)
        n = len(paths)
        if not 0 < self.test_size < n:
            raise DataError(
                f"data.test_size={self.test_size} must be between 1 and {n - 1} (the folder "
                f"{self.root} has {n} images), or give data.test_root"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed + 1))
        idx = perm[self.test_size :] if split == "train" else perm[: self.test_size]
        idx = idx.sort().values  # file order within a split
        return ImageFiles([paths[i] for i in idx], labels[idx], preprocess)

    @property
    def record_root(self) -> Path:
        return (
            self.root
            if self.test_root is None
            else Path(os.path.commonpath([self.root, self.test_root]))
        )

    def preprocessing(self) -> dict:
        test = (
            f"the folder {self.test_root}"
            if self.test_root is not None
            else f"{self.test_size} images drawn with seed split_seed + 1"
        )
        return {
            **super().preprocessing(),
            **self.image_preprocess().record(),
            "test": test,
        }

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(self.image_shape)
