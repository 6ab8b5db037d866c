"""MNIST and Fashion-MNIST from their IDX files."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from nfcv.data.base import LocalDataModule, torchvision_datasets
from nfcv.data.files import atomic_path, atomic_write_text, check_files, default_cache
from nfcv.errors import DataError, OutputError

# -- MNIST and Fashion-MNIST: IDX files

_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _check_idx(path: Path, shown: Path, ndim: int) -> int:
    """Check an uncompressed IDX file's header against its size (unsigned bytes, `ndim` sizes,
    28 x 28 images); returns the number of items. `shown` is the file named in errors."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
        size = path.stat().st_size
    except OSError as err:
        raise DataError(f"cannot read {shown}: {err}") from err
    if len(head) < 4 + 4 * ndim or head[:2] != b"\0\0" or head[2] != 0x08 or head[3] != ndim:
        raise DataError(
            f"{shown} is not an IDX file of unsigned bytes with {ndim} dimensions: the file is "
            "corrupt or not the one expected"
        )
    dims = struct.unpack(f">{ndim}I", head[4:])
    want = 4 + 4 * ndim + math.prod(dims)
    if size != want or (ndim == 3 and dims[1:] != (28, 28)):
        raise DataError(
            f"{shown} holds {size} bytes but its header announces {dims} ({want} bytes): the file "
            "is truncated or corrupt"
        )
    return dims[0]


def _chunks(path: Path) -> Iterator[bytes]:
    """The content of `path`, uncompressed if it is a ``.gz``; a `DataError` naming it if it
    cannot be read (a truncated or corrupt file)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as src:
            while chunk := src.read(1 << 20):
                yield chunk
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read {path}: {err}; the file is truncated or corrupt") from err


class _MNISTLike(LocalDataModule):
    """MNIST-family IDX files via torchvision. Accepts torchvision's layout
    (``ROOT/<Class>/raw/*-ubyte``) or the original distribution's flat folder of ``.gz`` files
    (as in Debian's dataset packages), which is staged once, uncompressed, into torchvision's
    layout under ``$NFCV_CACHE/staged``.

    Files are checked by structure (IDX header against size), not against torchvision's MD5s:
    those are of its own ``.gz`` files, and recompressed copies (Debian's) differ.
    """

    tv_name = ""
    num_classes = 10

    @property
    def tv_class(self):
        return getattr(torchvision_datasets(), self.tv_name)

    @property
    def _layout(self) -> Path:
        return self.root / self.tv_name / "raw"

    @property
    def record_root(self) -> Path:
        return self.root

    def _flat_files(self) -> list[Path] | None:
        gz = [self.root / f"{n}.gz" for n in _IDX_FILES]
        if all(f.is_file() for f in gz):
            return gz
        plain = [self.root / n for n in _IDX_FILES]
        return plain if all(f.is_file() for f in plain) else None

    def expected(self) -> str:
        return (
            f"{self._layout}/train-images-idx3-ubyte and the other IDX files, or the original "
            f".gz files in {self.root}"
        )

    def _located(self) -> tuple[Path, list[Path]]:
        """(the root to give torchvision, the files the data is read from)."""
        layout = [self._layout / n for n in _IDX_FILES]
        if all(f.is_file() for f in layout):
            return self.root, layout
        flat = self._flat_files()
        if flat is not None:
            return self._stage(flat), flat
        if self.download:
            try:
                for train in (True, False):
                    self.tv_class(str(self.root), train=train, download=True)
            except (RuntimeError, OSError) as err:  # OSError: URLError without internet
                raise self._download_failed(err) from err
            return self.root, layout
        raise self.missing_error([f for f in layout if not f.is_file()], self.expected())

    def source_files(self) -> list[Path]:
        return self._located()[1]

    def _stage(self, files: list[Path]) -> Path:
        """Uncompress (or copy) `files` into torchvision's layout under ``$NFCV_CACHE/staged``.

        Each staged file keeps beside it the size and sha256 of the source it was made from
        (``NAME.source.json``) and is made again when the source's differ, whatever the
        modification times say: training reads the content the run records. The digests are
        `check_files`'s, computed once per version of a file and cached.
        """
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        staged = default_cache() / "staged" / key
        raw = staged / self.tv_name / "raw"
        for f, record in zip(files, check_files(files), strict=True):
            target = raw / f.name.removesuffix(".gz")
            source = {"source": str(f.resolve()), "size": record.size, "sha256": record.sha256}
            made_from = target.with_name(f"{target.name}.source.json")
            try:
                if target.is_file() and json.loads(made_from.read_text()) == source:
                    continue
            except (OSError, ValueError):
                pass  # not staged yet, or by an older nfcv that kept no record: stage it
            try:
                with atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    for chunk in _chunks(f):
                        dst.write(chunk)
                atomic_write_text(made_from, json.dumps(source))
            except OutputError as err:  # writing the staged copy
                raise DataError(
                    f"cannot stage {f} into {raw} ({err}): set NFCV_CACHE to a writable folder "
                    "with room for the uncompressed files"
                ) from err
        return staged

    def _check_split(self, prefix: str) -> None:
        tv_root, sources = self._located()
        counts = []
        for kind, ndim in (("images-idx3", 3), ("labels-idx1", 1)):
            name = f"{prefix}-{kind}-ubyte"
            shown = next(f for f in sources if f.name.startswith(name))
            counts.append(_check_idx(Path(tv_root) / self.tv_name / "raw" / name, shown, ndim))
        if counts[0] != counts[1]:
            raise DataError(
                f"{self.name} {prefix}: {counts[0]} images but {counts[1]} labels in "
                f"{self.root}: one of the files is from another release"
            )

    def check_sources(self) -> None:
        for prefix in ("train", "t10k"):
            self._check_split(prefix)

    def load_split(self, split: str) -> tuple[Tensor, Tensor]:
        if split == "val":
            raise DataError(f"{self.name} has no official validation split: set data.val_size")
        self._check_split("train" if split == "train" else "t10k")
        tv_root, _ = self._located()
        ds = self.tv_class(str(tv_root), train=split == "train", download=False)
        return ds.data.unsqueeze(1).to(torch.uint8), ds.targets.to(torch.int64)


class MNISTDataModule(_MNISTLike):
    """MNIST (LeCun et al. 1998): 60,000 training and 10,000 test digits, 28 x 28."""

    name = "mnist"
    tv_name = "MNIST"


class FashionMNISTDataModule(_MNISTLike):
    """Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747): 60,000 + 10,000 images, 28 x 28."""

    name = "fashion_mnist"
    tv_name = "FashionMNIST"
    how_to_get = (
        " (the original Fashion-MNIST .gz files also work, e.g. Debian's dataset-fashion-mnist)"
    )
