"""Downsampled ImageNet (32x32, 64x64) from its npz batches, converted once to one .npy
per split and read row by row."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from nfcv.data.base import LocalDataModule
from nfcv.data.files import atomic_path, atomic_write_text, default_cache
from nfcv.data.images import ImageSource, NpyImages, read_npy_header
from nfcv.errors import DataError

# -- Downsampled ImageNet: npz batches, converted once to one .npy per split, read row by row

_NPZ_CHUNK_BYTES = 16 << 20  # rows are copied this many bytes at a time: the conversion's memory


def _npz_member_header(zf: zipfile.ZipFile, key: str, path: Path):
    """(open member file positioned at the data, shape, dtype) of array `key` of an npz."""
    f = zf.open(f"{key}.npy")
    shape, dtype = read_npy_header(f, f"{path}: array '{key}'")
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
            atomic_write_text(
                out / "manifest.json", json.dumps({"counts": counts, "root": str(self.data_dir)})
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
        labels = np.empty(total, dtype=np.int64)
        pos = 0
        # Plain writes of a few MB at a time: neither the batches nor the output are ever whole
        # in memory (writing through a memory map would keep its dirty pages resident).
        # Through temporary files (`atomic_path`): a failed conversion (a damaged batch, a full
        # disk) removes its partial copy, which can be many GB.
        with atomic_path(images_out) as tmp_images, open(tmp_images, "wb") as dst:
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
                    raise DataError(
                        f"cannot read {path} ({type(err).__name__}: {err}): the file is "
                        "truncated or corrupt"
                    ) from err
                y = np.asarray(y).reshape(-1)
                if len(y) != n or (n and (y.min() < 1 or y.max() > 1000)):
                    raise DataError(
                        f"{path}: {len(y)} labels for {n} images, or labels outside 1..1000"
                    )
                labels[pos : pos + n] = y - 1  # 1-based in the files
                pos += n
        with atomic_path(labels_out) as tmp_labels, open(tmp_labels, "wb") as f:
            np.save(f, labels)
        return total

    def load_split(self, split: str) -> ImageSource:
        if split == "val":
            raise DataError(f"{self.name} has no official validation split: set data.val_size")
        images, labels = self.arrays()[split]
        return NpyImages(images, torch.from_numpy(np.load(labels)))

    def preprocessing(self) -> dict:
        return {**super().preprocessing(), "format": "npz batches (Chrabaszcz et al. 2017)"}
