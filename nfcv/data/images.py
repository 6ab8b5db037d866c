"""Image datasets: images held in memory, read one at a time from files, resampled to a
configured shape; `reduce_bits` for fewer levels."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from nfcv.errors import DataError


def check_num_bits(num_bits) -> int:
    """`num_bits` as an int in 1..8 (the bits kept of 8-bit images), else a `DataError`."""
    if isinstance(num_bits, bool) or not isinstance(num_bits, (int, float, str)):
        bits = None
    else:
        try:
            bits = int(num_bits)
        except ValueError:
            bits = None
        if bits is not None and bits != float(num_bits):
            bits = None  # 5.5
    if bits is None or not 1 <= bits <= 8:
        raise DataError(
            f"data.num_bits={num_bits} is outside 1..8: images are 8-bit and num_bits is how "
            "many of their bits are kept (x >> (8 - num_bits)); e.g. data.num_bits=5 for "
            "Glow's 5-bit CelebA-HQ"
        )
    return bits


def reduce_bits(images: Tensor, num_bits: int) -> Tensor:
    """8-bit images to `num_bits` bits by dropping low bits, ``x >> (8 - num_bits)``
    (Glow's 5-bit CelebA-HQ)."""
    num_bits = check_num_bits(num_bits)
    return images >> (8 - num_bits) if num_bits < 8 else images


# ---------------------------------------------------------------------------------------------
# Datasets


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


class ImageSource(Dataset):
    """The images of one split, read one at a time (too many to hold in memory).

    ``read(i)`` returns image `i` as uint8 (C, H, W), before any `num_bits` reduction.
    """

    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read(self, i: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.read(i), self.labels[i]

    def read_many(self, indices: Sequence[int]) -> Tensor:
        """Images `indices` as one uint8 (n, C, H, W) tensor, in the order given. Sources that
        can read several images at once faster (`NpyImages`) override it."""
        return torch.stack([self.read(int(i)) for i in indices])


def contiguous_runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """The distinct `indices` sorted and cut into runs of consecutive values, as (first, count)
    pairs: ``[7, 3, 4, 5, 9, 4] -> [(3, 3), (7, 1), (9, 1)]``."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(int(i) for i in indices)):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def read_npy_header(f, where: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the ``.npy`` array whose file `f` starts here (a file on disk or an
    npz member), leaving `f` at the first byte of the data; an array in Fortran order, which
    nfcv cannot read as rows, is a `DataError` naming `where`."""
    version = np.lib.format.read_magic(f)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = reader(f)
    if fortran:
        raise DataError(f"{where}: the array is stored in Fortran order, not as rows")
    return tuple(shape), dtype


class NpyImages(ImageSource):
    """uint8 images (N, C, H, W) in a ``.npy`` file, read with ``os.preadv`` straight into the
    batch (an open file: no map): a batch's rows in as few reads as there are runs of
    consecutive rows among them (`read_many`), so neither the process's anonymous memory nor
    its resident set grows with the dataset; the OS's page cache keeps what fits. (A memory map
    would keep anonymous memory flat too, but every page it touches counts in the resident
    set, which schedulers that police RSS add up.) The file is opened lazily in each process
    (DataLoader workers too) and never pickled. `array` gives the whole file as a read-only
    memory map."""

    def __init__(self, path: Path, labels: Tensor):
        self.path = Path(path)
        self.labels = labels
        with open(self.path, "rb") as f:
            shape, dtype = read_npy_header(f, str(self.path))
            self.offset = f.tell()
        if dtype != np.uint8 or len(shape) != 4:
            raise DataError(
                f"{self.path} holds a {dtype} array of shape {shape}, not uint8 images "
                "(N, C, H, W): remove it, and nfcv writes it again from the source files"
            )
        self.image_shape = tuple(shape[1:])
        self.row = math.prod(self.image_shape)
        self._fd: int | None = None
        self._pid = -1

    @property
    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def _file(self) -> int:
        if self._pid != os.getpid():  # first read in this process (a forked worker too)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _pread_into(self, out: np.ndarray, first: int) -> None:
        """Rows ``first, first + 1, ...`` into `out` (len(out) rows) with one read (``preadv``
        straight into the array; ``pread`` and a copy where the OS has no preadv)."""
        fd, want, at = self._file(), out.nbytes, self.offset + first * self.row
        view = memoryview(out).cast("B")
        got = 0
        while got < want:  # a read may return less than asked (never for small reads of files)
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [view[got:]], at + got)
            else:
                buf = os.pread(fd, want - got, at + got)
                n = len(buf)
                view[got : got + n] = buf
            if n == 0:
                break
            got += n
        if got != want:
            last = first + want // self.row - 1
            raise DataError(
                f"{self.path} ends before image {last}: the converted copy is truncated; delete "
                "its folder and rerun to convert again"
            )

    def read(self, i: int) -> Tensor:
        out = np.empty((1, *self.image_shape), np.uint8)
        self._pread_into(out, int(i))
        return torch.from_numpy(out[0])

    def read_many(self, indices: Sequence[int]) -> Tensor:
        """Images `indices` in the order given, reading each run of consecutive rows among them
        with one read (a sequential batch: one read in all; a shuffled one: one per run)."""
        indices = [int(i) for i in indices]
        out = np.empty((len(indices), *self.image_shape), np.uint8)
        if not indices:
            return torch.from_numpy(out)
        if indices == list(range(indices[0], indices[0] + len(indices))):
            self._pread_into(out, indices[0])  # the common evaluation case: rows in order
            return torch.from_numpy(out)
        runs = contiguous_runs(indices)
        if len(runs) == len(indices):  # no two adjacent: read straight into place
            for k, i in enumerate(indices):
                self._pread_into(out[k : k + 1], i)
            return torch.from_numpy(out)
        rows = np.empty((sum(n for _, n in runs), *self.image_shape), np.uint8)
        where: dict[int, int] = {}
        pos = 0
        for first, n in runs:
            self._pread_into(rows[pos : pos + n], first)
            where.update((first + j, pos + j) for j in range(n))
            pos += n
        np.take(rows, [where[i] for i in indices], axis=0, out=out)
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


@dataclass(frozen=True)
class ImagePreprocess:
    """How a decoded image file becomes an integer image of `shape` (C, H, W).

    - ``crop``: (top, left, height, width) cut from the file's image first; None: none.
    - ``resample="bilinear"``: PIL's antialiased bilinear filter to (H, W); without a crop the
      image is first scaled so it covers (H, W) and then centre-cropped (torchvision's
      ``Resize`` + ``CenterCrop``).
    - ``resample="box"``: the mean of each f x f block (f = source size / target size, the same
      along both sides), rounded to the nearest integer (ties to even). For power-of-two f this is
      exactly Karras et al.'s dataset_tool, which made the CelebA-HQ resolutions Glow used.
    """

    shape: tuple[int, int, int]
    crop: tuple[int, int, int, int] | None = None
    resample: str = "bilinear"

    def __post_init__(self) -> None:
        if self.resample not in ("bilinear", "box"):
            raise DataError(f"data.resample must be bilinear or box, got {self.resample!r}")
        if self.shape[0] not in (1, 3):
            raise DataError(
                f"image files give 1 (grayscale) or 3 (RGB) channels, but data.image_shape "
                f"asks for {self.shape[0]}"
            )

    def record(self) -> dict:
        return {
            "crop_top_left_height_width": list(self.crop) if self.crop is not None else None,
            "resize_to": list(self.shape[1:]),
            "resample": self.resample,
            "mode": "L" if self.shape[0] == 1 else "RGB",
        }

    def check_size(self, width: int, height: int) -> str | None:
        """Why an image of `width` x `height` cannot be preprocessed (None if it can)."""
        if self.crop is not None:
            top, left, ch, cw = self.crop
            if top + ch > height or left + cw > width:
                return (
                    f"the crop (top, left, height, width) = {list(self.crop)} does not fit in "
                    f"its {height} x {width} pixels"
                )
            height, width = ch, cw
        if self.resample == "box":
            f = height // self.shape[1]
            if f < 1 or height != f * self.shape[1] or width != f * self.shape[2]:
                return (
                    f"box resampling needs an integer multiple of {self.shape[1]} x "
                    f"{self.shape[2]} with the same factor along both sides, got {height} x "
                    f"{width}"
                )
        return None

    def __call__(self, img) -> Tensor:
        from PIL import Image

        c, h, w = self.shape
        img = img.convert("L" if c == 1 else "RGB")
        if self.crop is not None:
            top, left, ch, cw = self.crop
            if top + ch > img.height or left + cw > img.width:
                raise ValueError(
                    f"the crop (top, left, height, width) = {self.crop} does not fit in the "
                    f"image of {img.height} x {img.width}"
                )
            img = img.crop((left, top, left + cw, top + ch))
        if self.resample == "box":
            arr = _box_downsample(np.asarray(img), h, w)
        else:
            if self.crop is None and (img.height, img.width) != (h, w):
                scale = max(h / img.height, w / img.width)
                size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
                img = img.resize(size, Image.BILINEAR)
                top = int(round((img.height - h) / 2.0))  # torchvision's CenterCrop rounding
                left = int(round((img.width - w) / 2.0))
                img = img.crop((left, top, left + w, top + h))
            elif (img.height, img.width) != (h, w):
                img = img.resize((w, h), Image.BILINEAR)
            arr = np.asarray(img)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        return torch.from_numpy(np.array(arr.transpose(2, 0, 1), order="C"))  # a writable copy


def _box_downsample(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Mean over f x f blocks, rounded (ties to even): (f*h, f*w[, C]) uint8 -> (h, w[, C])."""
    src_h, src_w = arr.shape[:2]
    f = src_h // h
    if f < 1 or src_h != f * h or src_w != f * w:
        raise ValueError(
            f"box resampling needs an image of an integer multiple of {h} x {w} with the same "
            f"factor along both sides, got {src_h} x {src_w}"
        )
    if f == 1:
        return arr
    blocks = arr.reshape(h, f, w, f, *arr.shape[2:]).sum((1, 3), dtype=np.int64)
    # Sums of integers divided by f*f, then np.rint: the same numbers as averaging in float32
    # halving by halving and rounding once (dataset_tool keeps the float image between halvings).
    return np.rint(blocks / (f * f)).clip(0, 255).astype(np.uint8)


class ImageFiles(ImageSource):
    """Image files decoded on demand with an `ImagePreprocess` (CelebA, CelebA-HQ, folders)."""

    def __init__(self, paths: Sequence[Path], labels: Tensor, preprocess: ImagePreprocess):
        self.paths = [str(p) for p in paths]
        self.labels = labels
        self.preprocess = preprocess

    def read(self, i: int) -> Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as img:
                return self.preprocess(img)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot read image {path}: {type(err).__name__}: {err}") from err


class IndexedImages(Dataset):
    """Images `indices` of an `ImageSource` (all of it if None), reduced to `num_bits` and, if
    `hflip`, flipped left-right with probability 1/2 (training only)."""

    def __init__(
        self,
        source: ImageSource,
        indices: Tensor | None = None,
        num_bits: int = 8,
        hflip: bool = False,
    ):
        self.source = source
        self.indices = indices
        self.shift = 8 - check_num_bits(num_bits)
        self.hflip = hflip
        self.labels = source.labels if indices is None else source.labels[indices]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _read(self, i: int) -> Tensor:
        j = int(self.indices[i]) if self.indices is not None else i
        x = self.source.read(j)
        return x >> self.shift if self.shift else x

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self._read(i)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.labels[i]

    def __getitems__(self, batch: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """A batch of samples, what torch's DataLoader asks for when a dataset has this method:
        the same samples as ``[self[i] for i in batch]`` (flips drawn from the same random
        stream in the same order), read with `ImageSource.read_many`."""
        batch = [int(i) for i in batch]
        if not batch:
            return []
        j = batch if self.indices is None else self.indices[batch].tolist()
        x = self.source.read_many(j)
        if self.shift:
            x >>= self.shift
        samples = []
        for k, i in enumerate(batch):
            xi = x[k]
            if self.hflip and torch.rand(()) < 0.5:
                xi = xi.flip(-1)
            samples.append((xi, self.labels[i]))
        return samples

    @property
    def images(self) -> Tensor:
        """The whole split as one (N, C, H, W) tensor, unflipped: reads every image, so only
        for small splits (tests, a few images for a figure)."""
        return torch.stack([self._read(i) for i in range(len(self))])


# ---------------------------------------------------------------------------------------------
# The base data module

Split = tuple[Tensor, Tensor] | ImageSource
