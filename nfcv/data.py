"""Lightning data modules for the benchmarks of the flow literature, read from local files.

Every dataset yields ``(image, label)``: the image an integer tensor (uint8) of shape (C, H, W)
with values in [0, num_bins - 1], the label an int64 class index (-1 where a dataset has none:
CelebA, CelebA-HQ). Dequantization happens in the model.

Where the files live, under ``data.root`` (default ``$NFCV_DATA``, else ``./data``):

==============  ================================================================================
``digits``      inside scikit-learn (no files to fetch)
``mnist``       ``ROOT/MNIST/raw/`` (torchvision's layout: the four IDX files, uncompressed), or
                the four original ``.gz`` files directly in ROOT (staged once under $NFCV_CACHE)
``fashion_``    the same with ``ROOT/FashionMNIST/raw/``
``mnist``
``cifar10``     ``ROOT/cifar-10-batches-py/``: ``data_batch_1..5``, ``test_batch``,
                ``batches.meta`` (the python pickle batches)
``cifar100``    ``ROOT/cifar-100-python/``: ``train``, ``test``, ``meta``
``svhn``        ``ROOT/svhn/``: ``train_32x32.mat``, ``test_32x32.mat`` (``extra_32x32.mat``)
``celeba``,     ``ROOT/celeba/``: ``img_align_celeba/*.jpg`` and torchvision's five text files
``celeba64``    (``list_eval_partition.txt``, ``list_attr_celeba.txt``, ``identity_CelebA.txt``,
                ``list_bbox_celeba.txt``, ``list_landmarks_align_celeba.txt``)
``celeba_hq``   ``ROOT/celeba_hq/``: the 30,000 CelebA-HQ images as image files named by their
                index (``0.png`` or ``00000.jpg`` ... ``29999``), square, at any power-of-two
                multiple of the configured size (1024 x 1024 as released)
``imagenet32``  ``ROOT/imagenet32/``: ``train_data_batch_1..10.npz`` and ``val_data.npz``
``imagenet64``  ``ROOT/imagenet64/``: the same names at 64 x 64
``folder``      ``data.root`` is an image folder in torchvision's ImageFolder layout:
                ``ROOT/<class>/<image>``
==============  ================================================================================

Nothing is downloaded unless ``data.download=true``; missing files give one `DataError` naming
the expected paths and the command that fetches them (``python scripts/prepare_data.py NAME
ROOT``, on a machine with internet). Every source file is read once at setup: hashed (sha256 and
MD5, checked against torchvision's MD5s where it lists them and ``verify`` is on), image files
decoded, the results cached in ``$NFCV_CACHE/files/`` keyed by path, size and modification time;
a truncated or corrupt file fails at setup with its name. `ImageDataModule.describe` records the
dataset, its split sizes, image shape, levels, preprocessing and the sha256 of its files, so two
bits-per-dim figures can be compared knowing they are on the same data.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from nfcv.errors import DataError
from nfcv.resume import ResumableShuffle, ShardedSequential

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NO_LABEL = -1  # the label of images of datasets without classes
LIST_FILES_UP_TO = 20  # describe() lists each file's sha256 up to this many files


def default_cache() -> Path:
    """``$NFCV_CACHE``, else ``~/.cache/nfcv``: staged, converted and checksum files."""
    return Path(os.environ.get("NFCV_CACHE", Path.home() / ".cache" / "nfcv")).expanduser()


def reduce_bits(images: Tensor, num_bits: int) -> Tensor:
    """8-bit images to `num_bits` bits by dropping low bits, ``x >> (8 - num_bits)``
    (Glow's 5-bit CelebA-HQ)."""
    if not 1 <= num_bits <= 8:
        raise DataError(f"data.num_bits must be in 1..8, got {num_bits}")
    return images >> (8 - num_bits) if num_bits < 8 else images


# ---------------------------------------------------------------------------------------------
# File checks and checksums, computed once and cached


@dataclass(frozen=True)
class FileRecord:
    """One source file as read: its size and digests (empty strings where not computed)."""

    path: Path
    size: int
    sha256: str = ""
    md5: str = ""
    image_size: tuple[int, int] | None = None  # (width, height) of an image file


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _cache_path(directory: Path) -> Path:
    key = hashlib.sha1(str(directory).encode()).hexdigest()[:16]
    return default_cache() / "files" / f"{key}.json"


def _load_cache(directory: Path) -> dict[str, dict]:
    try:
        data = json.loads(_cache_path(directory).read_text())
    except (OSError, ValueError):
        return {}
    return data.get("files", {}) if data.get("dir") == str(directory) else {}


def _save_cache(directory: Path, entries: dict[str, dict]) -> None:
    path = _cache_path(directory)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"dir": str(directory), "files": entries}))
        tmp.replace(path)  # atomic: concurrent runs never see half a file
    except OSError:
        pass  # a read-only cache only costs recomputing next time


def _inspect(path: Path, digest: bool) -> dict:
    """Read `path` once: its digests if asked, and a full decode if it is an image."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    image = _is_image(path)
    try:
        if image:
            data = path.read_bytes()
            if digest:
                sha.update(data)
                md5.update(data)
        elif digest:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
                    md5.update(chunk)
    except OSError as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if image:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decodes every pixel: a truncated file fails here, not mid-training
                width, height = img.size
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ...
            raise DataError(
                f"cannot decode image {path} ({type(err).__name__}: {err}): the file is "
                "truncated or corrupt; replace or remove it"
            ) from err
    entry: dict[str, Any] = {}
    if digest:
        entry.update(sha256=sha.hexdigest(), md5=md5.hexdigest())
    if image:
        entry.update(decodes=True, wh=[width, height])
    return entry


def check_files(
    paths: Sequence[Path], digest: bool = True, progress: bool = True
) -> list[FileRecord]:
    """Read every file of `paths` once: sha256 and MD5 (if `digest`), and decode image files.

    Results are cached in ``$NFCV_CACHE/files/`` (one JSON per folder) keyed by the resolved path,
    size and modification time, so a dataset is read in full only the first time. A file that
    cannot be read or decoded raises `DataError` naming it. Returns one `FileRecord` per path, in
    order.
    """
    paths = [Path(p) for p in paths]
    by_dir: dict[Path, dict[str, dict]] = {}
    todo: list[tuple[Path, dict]] = []
    stats: list[tuple[Path, str, int, int]] = []
    for path in paths:
        resolved = path.resolve()
        try:
            st = resolved.stat()
        except OSError as err:
            raise DataError(f"cannot read {path}: {err}") from err
        entries = by_dir.get(resolved.parent)
        if entries is None:
            entries = by_dir[resolved.parent] = _load_cache(resolved.parent)
        entry = entries.get(resolved.name)
        fresh = (
            entry is not None
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and (not digest or "sha256" in entry)
            and (not _is_image(path) or "wh" in entry)
        )
        if not fresh:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            entries[resolved.name] = entry
            if digest or _is_image(path):
                todo.append((path, entry))
        stats.append((resolved.parent, resolved.name, st.st_size, st.st_mtime_ns))

    errors: list[DataError] = []
    if todo:

        def work(item: tuple[Path, dict]) -> None:
            path, entry = item
            try:
                entry.update(_inspect(path, digest))
            except DataError as err:
                entry["failed"] = True
                errors.append(err)

        # Hashing and decoding release the GIL, so threads spread a first check over the cores.
        workers = min(8, os.cpu_count() or 1, len(todo))
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(work, todo)
            if progress and len(todo) >= 2000:
                from tqdm.auto import tqdm

                results = tqdm(results, total=len(todo), desc="nfcv: checking the data files once")
            for _ in results:
                pass
        for directory, entries in by_dir.items():
            _save_cache(directory, {k: v for k, v in entries.items() if not v.get("failed")})
    if errors:
        more = f" (and {len(errors) - 1} more files)" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}")
    records = []
    for path, (directory, name, size, _) in zip(paths, stats, strict=True):
        entry = by_dir[directory][name]
        wh = tuple(entry["wh"]) if "wh" in entry else None
        records.append(FileRecord(path, size, entry.get("sha256", ""), entry.get("md5", ""), wh))
    return records


def files_record(records: Sequence[FileRecord], root: Path) -> dict:
    """What describe() keeps of the files: count, bytes and one sha256 over every file's
    (path relative to `root`, size, sha256), sorted by path; each file's too when there are few.
    """
    rows = []
    for r in records:
        try:
            rel = r.path.relative_to(root).as_posix()
        except ValueError:
            rel = r.path.name
        rows.append((rel, r.size, r.sha256))
    rows.sort()
    total = hashlib.sha256()
    for rel, size, sha in rows:
        total.update(f"{rel}\t{size}\t{sha}\n".encode())
    out: dict[str, Any] = {
        "root": str(root),
        "count": len(rows),
        "bytes": sum(size for _, size, _ in rows),
        "sha256": total.hexdigest(),
    }
    if len(rows) <= LIST_FILES_UP_TO:
        out["list"] = [{"path": rel, "bytes": size, "sha256": sha} for rel, size, sha in rows]
    return out


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


class NpyImages(ImageSource):
    """uint8 images (N, C, H, W) in a ``.npy`` file, read one row at a time with ``os.pread``
    (an open file: no map), so neither the process's anonymous memory nor its resident set grows
    with the dataset; the OS's page cache keeps what fits. (A memory map would keep anonymous
    memory flat too, but every page it touches counts in the resident set, which schedulers
    that police RSS add up.) The file is opened lazily in each process (DataLoader workers
    too) and never pickled. `array` gives the whole file as a read-only memory map."""

    def __init__(self, path: Path, labels: Tensor):
        self.path = Path(path)
        self.labels = labels
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read_header(f)
            self.offset = f.tell()
        self.image_shape = tuple(shape[1:])
        self.row = math.prod(self.image_shape)
        self._fd: int | None = None
        self._pid = -1

    @property
    def array(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def read(self, i: int) -> Tensor:
        if self._pid != os.getpid():  # first read in this process (a forked worker too)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        buf = os.pread(self._fd, self.row, self.offset + i * self.row)
        if len(buf) != self.row:
            raise DataError(
                f"{self.path} ends before image {i}: the converted copy is truncated; delete its "
                "folder and rerun to convert again"
            )
        return torch.from_numpy(np.frombuffer(buf, np.uint8).reshape(self.image_shape).copy())

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
        self.shift = 8 - int(num_bits)
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

    @property
    def images(self) -> Tensor:
        """The whole split as one (N, C, H, W) tensor, unflipped: reads every image, so only
        for small splits (tests, a few images for a figure)."""
        return torch.stack([self._read(i) for i in range(len(self))])


# ---------------------------------------------------------------------------------------------
# The base data module

Split = tuple[Tensor, Tensor] | ImageSource


class ImageDataModule(L.LightningDataModule):
    """Base class: subclasses implement `load_split(split)` for 'train' and 'test' (and 'val'
    where the dataset has an official validation split) returning ``(images, labels)`` tensors
    held in memory or an `ImageSource` read on demand, and `source_files()`.

    The validation split is `val_size` training images drawn with a fixed seed (`split_seed`),
    so every run of a config sees the same three splits; ``val_size=None`` takes the dataset's
    official validation split instead. Training images are flipped left-right at random when
    `hflip` is set; validation and test images never are.
    """

    name = "images"
    num_classes: int | None = None

    def __init__(
        self,
        image_shape: Sequence[int],
        num_bins: int,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        val_size: int | None = 1000,
        split_seed: int = 0,
        num_workers: int = 0,
        hflip: bool = False,
        name: str | None = None,
        num_bits: int | None = None,
        checksum: bool = True,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_bins = int(num_bins)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_size = None if val_size is None else int(val_size)
        self.split_seed = int(split_seed)
        self.num_workers = int(num_workers)
        self.hflip = bool(hflip)
        self.num_bits = None if num_bits is None else int(num_bits)
        self.checksum = bool(checksum)
        if name is not None:
            self.name = name
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._files: dict | None = None

    # -- what subclasses provide

    def load_split(self, split: str) -> Split:  # pragma: no cover - interface
        raise NotImplementedError

    def source_files(self) -> list[Path]:
        """Every file the dataset is read from (all splits), for the checks and the record."""
        return []

    @property
    def record_root(self) -> Path:
        """The folder that recorded file paths are relative to."""
        return Path(".")

    def check_sources(self) -> None:
        """Cheap checks of the files of every split (IDX headers, pickles, ...), run at each
        setup, so a damaged test file fails before training rather than after it."""

    def image_preprocess(self) -> ImagePreprocess | None:
        """For datasets of image files: how each becomes an image (its sizes are checked)."""
        return None

    def preprocessing(self) -> dict:
        """How files become the images the model sees, for describe()."""
        out: dict[str, Any] = {}
        if self.num_bits is not None:
            out["num_bits"] = self.num_bits
            out["reduction"] = f"x >> {8 - self.num_bits}" if self.num_bits < 8 else "none"
        out["hflip_train"] = self.hflip
        out["val"] = (
            "official validation split"
            if self.val_size is None
            else f"{self.val_size} training images drawn with split_seed={self.split_seed}"
        )
        return out

    # -- checks

    def _check_levels(self) -> None:
        if self.num_bits is not None and self.num_bins != 2**self.num_bits:
            raise DataError(
                f"data.num_bins={self.num_bins} but data.num_bits={self.num_bits} gives "
                f"{2**self.num_bits} levels: set only data.num_bits (num_bins follows from it)"
            )

    def _checked(self, images: Tensor, split: str) -> Tensor:
        if tuple(images.shape[1:]) != self.image_shape:
            raise DataError(
                f"{self.name} {split} images have shape {tuple(images.shape[1:])} but the config "
                f"says data.image_shape={list(self.image_shape)}; fix data.image_shape"
            )
        if images.numel() == 0:
            raise DataError(f"the {self.name} {split} split has no images")
        hi = int(images.max())
        if images.min() < 0 or hi > self.num_bins - 1:
            raise DataError(
                f"{self.name} {split} pixel values reach {hi} but data.num_bins={self.num_bins} "
                f"allows at most {self.num_bins - 1}; fix data.num_bins / data.num_bits"
            )
        return images

    def _prepared(self, data: Split, split: str) -> Split:
        """Reduce to num_bits and check shape and range: every pixel of data held in memory; of
        data read on demand, the shape of the first image (its range follows from uint8 and
        num_bits == log2(num_bins), checked first)."""
        if isinstance(data, ImageSource):
            if len(data) == 0:
                raise DataError(f"the {self.name} {split} split has no images")
            shape = tuple(data.read(0).shape)
            if shape != self.image_shape:
                raise DataError(
                    f"{self.name} {split} images have shape {shape} but the config says "
                    f"data.image_shape={list(self.image_shape)}; fix data.image_shape"
                )
            return data
        images, labels = data
        if self.num_bits is not None:
            images = reduce_bits(images, self.num_bits)
        return self._checked(images, split), labels

    def _dataset(self, data: Split, indices: Tensor | None, hflip: bool) -> Dataset:
        if isinstance(data, ImageSource):
            return IndexedImages(data, indices, self.num_bits or 8, hflip)
        images, labels = data
        if indices is not None:
            images, labels = images[indices], labels[indices]
        return ImageTensorDataset(images, labels, hflip)

    def _require(self, paths: Sequence[Path]) -> None:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"{self.name}: files not found: {', '.join(map(str, missing[:4]))}")

    def files(self) -> dict | None:
        """Check every source file once (cached) and return its record (None without
        `checksum`): see `check_files` and `files_record`."""
        if self._files is None:
            paths = self.source_files()
            self._require(paths)
            records = check_files(paths, digest=self.checksum)
            preprocess = self.image_preprocess()
            for r in records if preprocess is not None else ():
                why = r.image_size is not None and preprocess.check_size(*r.image_size)
                if why:
                    raise DataError(f"cannot preprocess {r.path}: {why}; fix or remove it")
            self._files = files_record(records, self.record_root) if self.checksum else {}
        return self._files or None

    # -- Lightning hooks

    def setup(self, stage: str | None = None) -> None:
        want_fit = stage in (None, "fit", "validate")
        want_test = stage in (None, "test")
        if not ((want_fit and self.train_set is None) or (want_test and self.test_set is None)):
            return
        self._check_levels()
        fit = want_fit and self.train_set is None
        test = want_test and self.test_set is None
        loaded = {"train": self.load_split("train")} if fit else {}  # downloads if asked
        if fit and self.val_size is None:
            loaded["val"] = self.load_split("val")
        if test:
            loaded["test"] = self.load_split("test")
        # Every file of every split (image files decoded): a damaged test file fails now, not
        # after training, and a damaged image now, not in a DataLoader worker.
        self.check_sources()
        self.files()
        if fit:
            train = self._prepared(loaded["train"], "train")
            if self.val_size is None:
                val = self._prepared(loaded["val"], "val")
                self.train_set = self._dataset(train, None, self.hflip)
                self.val_set = self._dataset(val, None, False)
            else:
                n = len(train) if isinstance(train, ImageSource) else train[0].shape[0]
                if not 0 < self.val_size < n:
                    raise DataError(
                        f"data.val_size={self.val_size} must be between 1 and {n - 1} "
                        f"(the {self.name} training split has {n} images)"
                    )
                gen = torch.Generator().manual_seed(self.split_seed)
                perm = torch.randperm(n, generator=gen)
                val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
                self.train_set = self._dataset(train, train_idx, self.hflip)
                self.val_set = self._dataset(train, val_idx, False)
        if test:
            self.test_set = self._dataset(self._prepared(loaded["test"], "test"), None, False)

    def split(self, name: str) -> Dataset:
        """The dataset of split `name` ('train', 'val' or 'test'), set up on demand."""
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}': use train, val or test")
        self.setup("test" if name == "test" else "fit")
        return getattr(self, f"{name}_set")

    def describe(self) -> dict:
        """What a run saw, recorded in checkpoints (``data_info``) and eval JSON: the dataset,
        the sizes of the splits set up so far, image shape, levels, classes, preprocessing and
        the files (count, bytes, one sha256 over them)."""
        sizes = {
            s: len(getattr(self, f"{s}_set"))
            for s in SPLITS
            if getattr(self, f"{s}_set") is not None
        }
        return {
            "name": self.name,
            "image_shape": list(self.image_shape),
            "num_bins": self.num_bins,
            "num_classes": self.num_classes,
            "split_sizes": sizes,
            "preprocessing": self.preprocessing(),
            "files": self.files(),
        }

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Our own samplers (nfcv/resume.py): a training order drawn from (seed, epoch) that a
        # resumed run can continue mid-epoch, and evaluation shards without padding, both split
        # between the ranks of a distributed run. The loader's own generator keeps it from
        # drawing from the global RNG, which the training steps' noise comes from.
        seed = getattr(self, "shuffle_seed", None)
        seed = torch.initial_seed() if seed is None else int(seed)
        n = len(dataset)
        sampler = ResumableShuffle(n, seed=seed) if shuffle else ShardedSequential(n)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(seed),
        )

    def eval_loader(self, name: str) -> DataLoader:
        """Split `name` in order, `eval_batch_size` at a time (what nfcv-eval iterates)."""
        return self._loader(self.split(name), self.eval_batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        train = self.split("train")
        if len(train) < self.batch_size:  # drop_last would leave no batch at all
            raise DataError(
                f"the {self.name} training split has {len(train)} images, fewer than "
                f"data.batch_size={self.batch_size}: lower data.batch_size"
            )
        return self._loader(train, self.batch_size, shuffle=True)

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


# ---------------------------------------------------------------------------------------------
# Datasets read from files under data.root


def _tv():
    import torchvision.datasets as tvd

    return tvd


class LocalDataModule(ImageDataModule):
    """A dataset read from files under `root`: the missing-files message, `download`, `verify`.

    Subclasses name their folder under `root` (`folder`) and list the files they need.
    """

    folder = ""  # the dataset's folder under root ('' for root itself)
    how_to_get = ""  # extra advice for the missing-files message
    can_download = True
    lists_md5s = False  # torchvision lists MD5s of the files (checked with `verify`)

    def __init__(
        self,
        root: str,
        download: bool = False,
        verify: bool = True,
        num_bits: int = 8,
        **kwargs,
    ):
        super().__init__(num_bits=num_bits, **kwargs)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = bool(download)
        self.verify = bool(verify)
        self._verified = False

    @property
    def data_dir(self) -> Path:
        return self.root / self.folder if self.folder else self.root

    @property
    def record_root(self) -> Path:
        return self.data_dir

    def fetch_command(self) -> str:
        return f"python scripts/prepare_data.py {self.name} {self.root}"

    def missing_error(self, missing: Sequence[Path], expected: str, cause: str = "") -> DataError:
        shown = ", ".join(map(str, missing[:3]))
        if len(missing) > 3:
            shown += f" and {len(missing) - 3} more"
        fetch = (
            f"on a machine with internet run `{self.fetch_command()}` (it downloads and "
            "verifies them; copy the folder here if this machine has none), or pass "
            "data.download=true where this machine has internet"
            if self.can_download
            else f"`{self.fetch_command()}` says where to get them and checks them (this "
            "dataset cannot be downloaded automatically, so data.download=true does not help)"
        )
        return DataError(
            f"{self.name} files not found under {self.root}: missing {shown} (expected "
            f"{expected}). Fix: {fetch}; then point data.root (or the NFCV_DATA environment "
            f"variable) at the folder that holds them{self.how_to_get}"
            + (f" [{cause}]" if cause else "")
        )

    def expected(self) -> str:
        return f"the {self.name} files in {self.data_dir}"

    def _require(self, paths: Sequence[Path]) -> None:
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise self.missing_error(missing, self.expected())

    def _verify_md5(self, expected: dict[Path, str]) -> None:
        """Check files against the MD5s torchvision lists (once per module), naming the first
        that differs. Skipped with ``verify=false``."""
        if not self.verify or self._verified:
            return
        self._require(list(expected))
        for record in check_files(list(expected)):
            want = expected[record.path]
            if record.md5 != want:
                raise DataError(
                    f"{record.path} does not match torchvision's MD5 ({record.md5} != {want}): "
                    "the file is truncated, corrupt or of another release. Fetch it again "
                    f"(`{self.fetch_command()}`), or pass data.verify=false to read it anyway "
                    "(the run still records its sha256)"
                )
        self._verified = True

    def _download_failed(self, err: Exception) -> DataError:
        return DataError(
            f"downloading {self.name} into {self.root} failed ({type(err).__name__}: {err}). "
            f"Without internet, run `{self.fetch_command()}` on a machine that has it and copy "
            "the folder here; then pass data.download=false"
        )

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "md5_checked": self.verify and self.lists_md5s}


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
        return getattr(_tv(), self.tv_name)

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
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:12]
        staged = default_cache() / "staged" / key
        raw = staged / self.tv_name / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for f in files:
            target = raw / f.name.removesuffix(".gz")
            if target.is_file() and target.stat().st_mtime >= f.stat().st_mtime:
                continue
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            opener = gzip.open if f.suffix == ".gz" else open
            try:
                with opener(f, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as err:
                tmp.unlink(missing_ok=True)
                raise DataError(
                    f"cannot read {f}: {err}; the file is truncated or corrupt"
                ) from err
            tmp.replace(target)
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
        return getattr(_tv(), self.tv_name)

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
        return _tv().SVHN

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
        rows = _tv().CelebA.file_list
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
                _tv().CelebA(str(self.root), split="all", target_type=[], download=True)
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

        class _Checked(_tv().CelebA):
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
        paths = [p for p in self.data_dir.iterdir() if p.is_file() and _is_image(p)]
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
                found = _tv().ImageFolder(str(root))
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


# -- Downsampled ImageNet: npz batches, converted once to one .npy per split, read row by row

_NPZ_CHUNK_BYTES = 16 << 20  # rows are copied this many bytes at a time: the conversion's memory


def _npz_member_header(zf: zipfile.ZipFile, key: str, path: Path):
    """(open member file positioned at the data, shape, dtype) of array `key` of an npz."""
    f = zf.open(f"{key}.npy")
    version = np.lib.format.read_magic(f)
    reader = (
        np.lib.format.read_array_header_1_0
        if version == (1, 0)
        else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = reader(f)
    if fortran:
        raise DataError(f"{path}: array '{key}' is stored in Fortran order, not as rows")
    return f, shape, dtype


class ImageNetDataModule(LocalDataModule):
    """Downsampled ImageNet at 32 x 32 or 64 x 64 (`image_shape`), the benchmark of van den Oord
    et al. 2016 (arXiv:1601.06759), in the npz batches image-net.org distributes (Chrabaszcz et
    al. 2017, arXiv:1707.08819): ``train_data_batch_1..10.npz`` (1,281,167 images) and
    ``val_data.npz`` (50,000: the test split), each with ``data`` (N, 3*H*W) uint8 rows, channel
    planes R, G, B in order, and ``labels`` 1..1000.

    1.28M images do not fit comfortably in memory (64 x 64: 15.7 GB), so the first setup copies
    the batches, a few MB at a time, into one ``.npy`` per split under
    ``$NFCV_CACHE/arrays/`` (as much disk as the images), and every run reads them row by row
    (`NpyImages`).
    """

    name = "imagenet32"
    num_classes = 1000
    can_download = False
    how_to_get = (
        ". image-net.org serves them after login (Downsampled ImageNet, npz format, e.g. "
        "Imagenet32_train_npz.zip and Imagenet32_val_npz.zip): unzip all batches into that folder"
    )
    train_files = tuple(f"train_data_batch_{i}.npz" for i in range(1, 11))
    test_file = "val_data.npz"

    @property
    def folder(self) -> str:  # type: ignore[override]
        return self.name

    def expected(self) -> str:
        first, last = self.train_files[0], self.train_files[-1]
        return f"{first} ... {last} and {self.test_file} in {self.data_dir}"

    def source_files(self) -> list[Path]:
        return [self.data_dir / n for n in (*self.train_files, self.test_file)]

    def _cache_dir(self) -> Path:
        sources = self.source_files()
        self._require(sources)
        stamp = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
        key = hashlib.sha1(json.dumps([list(self.image_shape), stamp]).encode()).hexdigest()[:16]
        return default_cache() / "arrays" / f"{self.name}-{key}"

    def arrays(self) -> dict[str, tuple[Path, Path]]:
        """{split: (images .npy, labels .npy)}, converting the npz batches the first time."""
        out = self._cache_dir()
        splits = {
            "train": [self.data_dir / n for n in self.train_files],
            "test": [self.data_dir / self.test_file],
        }
        done = {s: (out / f"{s}_images.npy", out / f"{s}_labels.npy") for s in splits}
        if (out / "manifest.json").is_file():
            return done
        try:
            out.mkdir(parents=True, exist_ok=True)
            counts = {s: self._convert(files, *done[s]) for s, files in splits.items()}
            (out / "manifest.json").write_text(
                json.dumps({"counts": counts, "root": str(self.data_dir)})
            )
        except OSError as err:
            raise DataError(
                f"cannot write the .npy copy of {self.name} under {out} ({err}): set "
                "NFCV_CACHE to a writable folder with as much free space as the npz batches "
                "hold uncompressed (32 x 32: 4 GB; 64 x 64: 16 GB)"
            ) from err
        return done

    def _convert(self, files: list[Path], images_out: Path, labels_out: Path) -> int:
        c, h, w = self.image_shape
        row = c * h * w
        headers = []
        for path in files:
            try:
                with zipfile.ZipFile(path) as zf:
                    f, shape, dtype = _npz_member_header(zf, "data", path)
                    f.close()
            except (zipfile.BadZipFile, KeyError, ValueError, EOFError, OSError) as err:
                raise DataError(
                    f"cannot read {path} ({type(err).__name__}: {err}): the file is truncated, "
                    "corrupt or not an npz batch with a 'data' array"
                ) from err
            if dtype != np.uint8 or len(shape) != 2 or shape[1] != row:
                raise DataError(
                    f"{path} holds 'data' of {dtype} {shape}, but data.image_shape="
                    f"{list(self.image_shape)} needs uint8 rows of {row} values (use imagenet32 "
                    "for the 32 x 32 files and imagenet64 for the 64 x 64 ones)"
                )
            headers.append(shape[0])
        total = sum(headers)
        tmp_images = images_out.with_name(f"{images_out.name}.{os.getpid()}.tmp")
        labels = np.empty(total, dtype=np.int64)
        pos = 0
        # Plain writes of a few MB at a time: neither the batches nor the output are ever whole
        # in memory (writing through a memory map would keep its dirty pages resident).
        with open(tmp_images, "wb") as dst:
            header = {"descr": "|u1", "fortran_order": False, "shape": (total, c, h, w)}
            np.lib.format.write_array_header_1_0(dst, header)
            for path, n in zip(files, headers, strict=True):
                try:
                    with zipfile.ZipFile(path) as zf:
                        f, _, _ = _npz_member_header(zf, "data", path)
                        with f:
                            step = max(1, _NPZ_CHUNK_BYTES // row)
                            for start in range(0, n, step):
                                want = min(step, n - start) * row
                                buf = f.read(want)
                                if len(buf) != want:
                                    raise EOFError(f"'data' ends after {start} rows of {n}")
                                dst.write(buf)
                        with zf.open("labels.npy") as lf:
                            y = np.load(lf, allow_pickle=False)
                except (zipfile.BadZipFile, KeyError, ValueError, EOFError) as err:
                    tmp_images.unlink(missing_ok=True)
                    raise DataError(
                        f"cannot read {path} ({type(err).__name__}: {err}): the file is "
                        "truncated or corrupt"
                    ) from err
                y = np.asarray(y).reshape(-1)
                if len(y) != n or (n and (y.min() < 1 or y.max() > 1000)):
                    tmp_images.unlink(missing_ok=True)
                    raise DataError(
                        f"{path}: {len(y)} labels for {n} images, or labels outside 1..1000"
                    )
                labels[pos : pos + n] = y - 1  # 1-based in the files
                pos += n
        tmp_labels = labels_out.with_name(f"{labels_out.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp_labels, labels)
        tmp_labels.replace(labels_out)
        tmp_images.replace(images_out)
        return total

    def load_split(self, split: str) -> ImageSource:
        if split == "val":
            raise DataError(f"{self.name} has no official validation split: set data.val_size")
        images, labels = self.arrays()[split]
        return NpyImages(images, torch.from_numpy(np.load(labels)))

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "format": "npz batches (Chrabaszcz et al. 2017)"}
