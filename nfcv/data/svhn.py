"""SVHN cropped digits from torchvision's ``.mat`` files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from nfcv.data.base import LocalDataModule, torchvision_datasets
from nfcv.errors import DataError


class SVHNDataModule(LocalDataModule):
    """SVHN cropped digits (Netzer et al. 2011) via torchvision's reader of the ``.mat`` files in
    ``ROOT/svhn``: 73,257 training and 26,032 test images, 32 x 32 (``extra=true`` adds the
    531,131 easier ``extra`` images to training). Label 10 (digit 0) becomes 0."""

    name = "svhn"
    folder = "svhn"
    num_classes = 10
    lists_md5s = True

    def __init__(self, extra: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.extra = bool(extra)

    def _parts(self, split: str) -> list[str]:
        return (["train", "extra"] if self.extra else ["train"]) if split == "train" else [split]

    def _listed(self) -> dict[Path, str]:
        rows = self._tv_class().split_list
        return {
            self.data_dir / rows[part][1]: rows[part][2]
            for part in (*self._parts("train"), "test")
        }

    def _tv_class(self):
        return torchvision_datasets().SVHN

    def expected(self) -> str:
        return f"{', '.join(p.name for p in self._listed())} in {self.data_dir}"

    def source_files(self) -> list[Path]:
        return list(self._listed())

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            raise DataError("svhn has no official validation split: set data.val_size")
        listed = self._listed()
        if self.download and not all(p.is_file() for p in listed):
            try:
                for part in (*self._parts("train"), "test"):
                    self._tv_class()(str(self.data_dir), split=part, download=True)
            except (RuntimeError, OSError) as err:
                raise self._download_failed(err) from err
        self._require(list(listed))
        self._verify_md5(listed)

        class _Checked(self._tv_class()):
            def _check_integrity(self) -> bool:  # checked above
                return True

        images, labels = [], []
        for part in self._parts(split):
            path = self.data_dir / self._tv_class().split_list[part][1]
            try:
                ds = _Checked(str(self.data_dir), split=part, download=False)
                x = np.ascontiguousarray(ds.data)
                if x.dtype != np.uint8 or x.shape[1:] != (3, 32, 32) or len(x) != len(ds.labels):
                    raise ValueError(f"images of {x.dtype} {x.shape}, {len(ds.labels)} labels")
            except ImportError as err:
                raise DataError(f"reading SVHN's .mat files needs scipy: {err}") from err
            except Exception as err:  # scipy raises many types for damaged files
                raise DataError(
                    f"cannot read {path} ({type(err).__name__}: {err}): the file is truncated "
                    f"or corrupt. Fetch it again (`{self.fetch_command()}`)"
                ) from err
            images.append(torch.from_numpy(x))
            labels.append(torch.from_numpy(ds.labels.astype(np.int64)))
        return torch.cat(images), torch.cat(labels)

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "extra_in_train": self.extra}
