"""Loader benchmark: do nfcv's data loaders keep up with a GPU?

    python benchmarks/loader.py                                  # imagenet64 and celeba64
    python benchmarks/loader.py --datasets imagenet64 --workers 0 1 2 --out loader.json

It writes its own data in the real on-disk formats nfcv reads, under ``--dir`` (a temporary
folder by default, removed at the end):

- ``imagenet64``: image-net.org's npz batches, ``ROOT/imagenet64/train_data_batch_1..10.npz``
  and ``val_data.npz`` of random 64 x 64 rows, which nfcv's first setup converts to one ``.npy``
  per split (under ``NFCV_CACHE``, set to the same folder);
- ``celeba64``: CelebA as torchvision keeps it, ``ROOT/celeba/img_align_celeba/NNNNNN.jpg``
  (178 x 218 JPEGs of gradients with pixel noise, quality 75: about 6 KB each, near CelebA's
  average of about 7 KB, since decoding time grows with the file) and the five text files,
  read with ``data=celeba64``'s crop and resize.

For each dataset and worker count it builds the data module from nfcv's own config
(``nfcv.compose(["data=NAME", ...])``), sets it up, and iterates its training DataLoader (the
shuffled order, flips where the config has them, batches of ``--batch-size``): the first
``--skip`` batches start the workers and are not timed; the next batches are. It prints one row
per configuration, images per second and images per second per worker (a worker count of 0
loads in the main process and counts as one), and writes them as JSON with ``--out``.

The ImageNet arrays are read from the OS's page cache once written (a machine whose cache
cannot hold the 16 GB copy reads from disk instead: a disk's throughput then bounds the figure).
Run it on an idle machine: other work on the cores shows in every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("imagenet64", "celeba64")
CELEBA_SIZE = (178, 218)  # width, height of the aligned CelebA JPEGs


def write_imagenet(root: Path, side: int, n_train: int, n_test: int, seed: int = 0) -> None:
    """``ROOT/imagenet{side}/``: ten ``train_data_batch_i.npz`` (``data`` rows of 3*side*side
    uint8, R, G, B planes; ``labels`` 1..1000) holding `n_train` images, and ``val_data.npz``."""
    folder = root / f"imagenet{side}"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [n_train // 10 + (i < n_train % 10) for i in range(10)]
    for i, n in enumerate(sizes, start=1):
        x = rng.integers(0, 256, (n, 3 * side * side), dtype=np.uint8)
        np.savez(folder / f"train_data_batch_{i}.npz", data=x, labels=rng.integers(1, 1001, n))
    x = rng.integers(0, 256, (n_test, 3 * side * side), dtype=np.uint8)
    np.savez(folder / "val_data.npz", data=x, labels=rng.integers(1, 1001, n_test))


def write_celeba(root: Path, n_train: int, n_other: int, seed: int = 0) -> None:
    """``ROOT/celeba/``: `n_train` training JPEGs and `n_other` each of validation and test in
    ``img_align_celeba/``, and torchvision's five text files (partition, identities, boxes,
    landmarks, 40 attributes)."""
    from PIL import Image

    base = root / "celeba"
    images = base / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    parts = [0] * n_train + [1] * n_other + [2] * n_other
    names = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    rng = np.random.default_rng(seed)
    w, h = CELEBA_SIZE
    yy, xx = np.mgrid[0:h, 0:w]
    for name in names:
        colour = rng.integers(0, 256, 3)
        noise = rng.integers(0, 13, (h, w, 3))  # texture: files of about 6 KB
        img = (colour + 0.5 * xx[..., None] + 0.3 * yy[..., None] + noise) % 256
        Image.fromarray(img.astype(np.uint8)).save(images / name, quality=75)
    n = len(names)
    attrs = [f"Attr_{i}" for i in range(40)]
    lines = {
        "list_eval_partition.txt": [f"{m} {p}" for m, p in zip(names, parts, strict=True)],
        "identity_CelebA.txt": [f"{m} {i % 3 + 1}" for i, m in enumerate(names)],
        "list_bbox_celeba.txt": [str(n), "image_id x_1 y_1 width height"]
        + [f"{m}    95  71 226 313" for m in names],
        "list_landmarks_align_celeba.txt": [
            str(n),
            "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
            "rightmouth_x rightmouth_y",
        ]
        + [f"{m} 69 109 106 113 77 142 73 152 108 154" for m in names],
        "list_attr_celeba.txt": [str(n), " ".join(attrs)]
        + [f"{m} " + " ".join(["-1", " 1"] * 20) for m in names],
    }
    for fname, rows in lines.items():
        (base / fname).write_text("\n".join(rows) + "\n")


def measure(
    dataset: str,
    root: Path,
    workers: int,
    batch_size: int,
    batches: int,
    skip: int,
    val_size: int = 100,
) -> dict[str, Any]:
    """Images per second through the training DataLoader of nfcv's data module for `dataset`."""
    from hydra.utils import instantiate

    import nfcv

    cfg = nfcv.compose(
        [
            f"data={dataset}",
            f"data.root={root}",
            f"data.num_workers={workers}",
            f"data.batch_size={batch_size}",
            "data.checksum=false",
            "data.verify=false",
            *([f"data.val_size={val_size}"] if dataset.startswith("imagenet") else []),
        ]
    )
    dm = instantiate(cfg.data)
    dm.setup("fit")
    loader = dm.train_dataloader()
    available = len(loader)
    if available < skip + batches:
        raise SystemExit(
            f"{dataset}: {available} training batches of {batch_size}, fewer than --skip "
            f"{skip} + --batches {batches}: write more images or time fewer batches"
        )
    it = iter(loader)
    for _ in range(skip):
        next(it)
    images = 0
    start = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        images += x.shape[0]
    seconds = time.perf_counter() - start
    del it
    rate = images / seconds
    return {
        "dataset": dataset,
        "workers": workers,
        "batch_size": batch_size,
        "images": images,
        "seconds": round(seconds, 4),
        "img_per_s": round(rate, 1),
        "img_per_s_per_worker": round(rate / max(1, workers), 1),
        "image_shape": list(cfg.data.image_shape),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches per configuration")
    p.add_argument("--skip", type=int, default=2, help="untimed batches first (worker start)")
    p.add_argument("--imagenet-images", type=int, default=10_000, help="training images written")
    p.add_argument("--celeba-images", type=int, default=3_000, help="training JPEGs written")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="nfcv-loader-")) if args.dir is None else args.dir
    root = tmp / "data"
    os.environ["NFCV_CACHE"] = str(tmp / "cache")  # the .npy copy of ImageNet goes here
    rows = []
    try:
        if "imagenet64" in args.datasets:
            write_imagenet(root, 64, args.imagenet_images, 100)
        if "celeba64" in args.datasets:
            write_celeba(root, args.celeba_images, 8)
        print(f"{'dataset':<11} {'workers':>7} {'batch':>5} {'img/s':>9} {'img/s/worker':>13}")
        for dataset in args.datasets:
            for workers in args.workers:
                val = max(1, min(100, args.imagenet_images // 10))  # ImageNet's val_size
                row = measure(
                    dataset, root, workers, args.batch_size, args.batches, args.skip, val
                )
                rows.append(row)
                print(
                    f"{dataset:<11} {workers:>7} {args.batch_size:>5} {row['img_per_s']:>9.0f} "
                    f"{row['img_per_s_per_worker']:>13.0f}",
                    flush=True,
                )
    finally:
        if args.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.out is not None:
        record = {
            "machine": {
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "cpus_available": len(os.sched_getaffinity(0)),
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
        }
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
