"""CelebA (aligned JPEGs) and CelebA-HQ (image files named by index)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from nfcv.data.base import LocalDataModule, torchvision_datasets
from nfcv.data.files import NO_LABEL, is_image
from nfcv.data.images import ImageFiles, ImagePreprocess, ImageSource
from nfcv.errors import DataError

# -- CelebA: aligned JPEGs and torchvision's text files


class CelebADataModule(LocalDataModule):
    """CelebA (Liu et al. 2015), the aligned and cropped 178 x 218 JPEGs, read through
    torchvision's `CelebA` (``ROOT/celeba``) with its official train / valid / test partition
    (162,770 / 19,867 / 19,962 images) and decoded on demand.

    Each image is cut to `crop` = (top, left, height, width) (None: none) and resized to
    `image_shape` (`ImagePreprocess`). `verify` checks torchvision's five text files against its
    MD5s; torchvision lists none for the images, which are decoded once at the first setup and
    recorded by sha256.
    """

    name = "celeba"
    folder = "celeba"
    lists_md5s = True  # of the text files
    how_to_get = (
        " (torchvision downloads CelebA from Google Drive with the gdown package, which Drive "
        "quotas often refuse: the files are also on the CelebA web page)"
    )

    def __init__(self, crop: Sequence[int] | None = None, resample: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        self.crop = tuple(int(c) for c in crop) if crop is not None else None
        self.resample = resample

    @property
    def image_dir(self) -> Path:
        return self.data_dir / "img_align_celeba"

    def _text_files(self) -> dict[Path, str]:
        rows = torchvision_datasets().CelebA.file_list
        return {
            self.data_dir / name: md5
            for _, md5, name in rows
            if not name.endswith((".zip", ".7z"))
        }

    def expected(self) -> str:
        names = ", ".join(p.name for p in self._text_files())
        return f"{self.image_dir}/*.jpg and {names} in {self.data_dir}"

    def _ensure(self) -> None:
        texts = list(self._text_files())
        if self.download and not (all(p.is_file() for p in texts) and self.image_dir.is_dir()):
            try:
                torchvision_datasets().CelebA(
                    str(self.root), split="all", target_type=[], download=True
                )
            except (RuntimeError, OSError, ImportError) as err:  # ImportError: no gdown
                raise self._download_failed(err) from err
        self._require(texts)
        if not self.image_dir.is_dir():
            raise self.missing_error([self.image_dir], self.expected())
        self._verify_md5(self._text_files())

    def _partition(self) -> list[str]:
        path = self.data_dir / "list_eval_partition.txt"
        try:
            names = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"cannot read {path}: {err}") from err
        return names

    def source_files(self) -> list[Path]:
        self._ensure()
        return [*self._text_files(), *(self.image_dir / n for n in self._partition())]

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(self.image_shape, self.crop, self.resample)

    def load_split(self, split: str) -> ImageSource:
        self._ensure()

        class _Checked(torchvision_datasets().CelebA):
            def _check_integrity(self) -> bool:  # checked above
                return True

        part = {"train": "train", "val": "valid", "test": "test"}[split]
        try:
            ds = _Checked(str(self.root), split=part, target_type=[], download=False)
        except Exception as err:  # a damaged text file: int() and csv errors
            files = ", ".join(map(str, self._text_files()))
            raise DataError(
                f"cannot parse CelebA's text files ({type(err).__name__}: {err}): one of {files} "
                "is truncated or corrupt (data.verify=true names it by its MD5)"
            ) from err
        paths = [self.image_dir / n for n in ds.filename]
        labels = torch.full((len(paths),), NO_LABEL, dtype=torch.int64)
        return ImageFiles(paths, labels, self.image_preprocess())

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), **self.image_preprocess().record()}


# -- CelebA-HQ: a folder of images named by index


def _numeric_order(paths: list[Path]) -> list[Path]:
    if paths and all(p.stem.isdigit() for p in paths):
        return sorted(paths, key=lambda p: int(p.stem))
    return sorted(paths)


class CelebAHQDataModule(LocalDataModule):
    """CelebA-HQ (Karras et al. 2018, arXiv:1710.10196): 30,000 faces at 1024 x 1024, not a
    torchvision dataset. Read from ``ROOT/celeba_hq/``: one image file per face, named by its
    CelebA-HQ index (``0.png``/``00000.jpg`` ... ``29999``), in index order; the last `test_size`
    are the test split (Glow used 27,000 / 3,000; its exact draw is not published).

    Each image is box-downsampled to `image_shape` (`ImagePreprocess`, ``resample="box"``), as
    Karras et al.'s dataset_tool made the lower resolutions, and reduced to `num_bits`.
    """

    name = "celeba_hq"
    folder = "celeba_hq"
    can_download = False
    how_to_get = (
        ". CelebA-HQ is not downloadable by script: build it with Karras et al.'s dataset_tool "
        "(github.com/tkarras/progressive_growing_of_gans) from CelebA and their deltas, or use "
        "a released copy such as CelebAMask-HQ's CelebA-HQ-img/ (JPEG re-encodings: bits per "
        "dim on them are not exactly comparable with Glow's), as one image file per face"
    )

    def __init__(self, test_size: int = 3000, resample: str = "box", **kwargs):
        super().__init__(**kwargs)
        self.test_size = int(test_size)
        self.resample = resample

    def expected(self) -> str:
        return f"{self.data_dir}/0.png (or 00000.jpg) ... 29999: one image per face"

    def _images(self) -> list[Path]:
        if not self.data_dir.is_dir():
            raise self.missing_error([self.data_dir], self.expected())
        paths = [p for p in self.data_dir.iterdir() if p.is_file() and is_image(p)]
        if not paths:
            raise self.missing_error([self.data_dir / "0.png"], self.expected())
        return _numeric_order(paths)

    def source_files(self) -> list[Path]:
        return self._images()

    def load_split(self, split: str) -> ImageSource:
        if split == "val":
            raise DataError("celeba_hq has no official validation split: set data.val_size")
        paths = self._images()
        if not 0 < self.test_size < len(paths):
            raise DataError(
                f"data.test_size={self.test_size} must be between 1 and {len(paths) - 1} (the "
                f"folder {self.data_dir} has {len(paths)} images)"
            )
        cut = len(paths) - self.test_size
        paths = paths[:cut] if split == "train" else paths[cut:]
        labels = torch.full((len(paths),), NO_LABEL, dtype=torch.int64)
        return ImageFiles(paths, labels, self.image_preprocess())

    def image_preprocess(self) -> ImagePreprocess:
        return ImagePreprocess(self.image_shape, None, self.resample)

    def preprocessing(self) -> dict:
        return {
            **super().preprocessing(),
            **self.image_preprocess().record(),
            "test": f"the last {self.test_size} images in index order",
        }


# -- Any folder of images
