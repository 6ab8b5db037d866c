"""scikit-learn's 8x8 digits: the embedded default dataset (no files to fetch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nfcv.data.base import ImageDataModule
from nfcv.errors import DataError


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16: 17 levels).

    Shipped inside scikit-learn, so it needs no download: the default dataset. There is no official
    test split; `test_size` images are held out with a fixed permutation (`split_seed`).
    """

    name = "digits"
    num_classes = 10

    def __init__(self, test_size: int = 297, **kwargs):
        super().__init__(**kwargs)
        self.test_size = int(test_size)

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        from sklearn.datasets import load_digits

        if split == "val":
            raise DataError("digits has no official validation split: set data.val_size")
        digits = load_digits()
        images = torch.from_numpy(digits.images.astype(np.uint8)).unsqueeze(1)
        labels = torch.from_numpy(digits.target.astype(np.int64))
        n = images.shape[0]
        if not 0 < self.test_size < n:
            raise DataError(f"data.test_size must be between 1 and {n - 1}, got {self.test_size}")
        # A seed distinct from the val split's, so test and val are independent draws.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed + 1))
        idx = perm[self.test_size :] if split == "train" else perm[: self.test_size]
        return images[idx], labels[idx]

    def source_files(self) -> list[Path]:
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
        return [path] if path.is_file() else []

    @property
    def record_root(self) -> Path:
        import sklearn.datasets

        return Path(sklearn.datasets.__file__).parent / "data"

    def preprocessing(self) -> dict:
        return {
            **super().preprocessing(),
            "test": f"{self.test_size} images drawn with seed split_seed + 1",
        }
