"""The data pipeline for a GPU: batched reads of the ImageNet arrays (the same samples in the same
order as one read per image), pinned memory exactly when training on CUDA, worker counts from the
CPUs available, and the loader benchmark (benchmarks/loader.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset

import nfcv
import nfcv.data.base as base
from nfcv.data.images import IndexedImages, NpyImages, contiguous_runs
from nfcv.data.samplers import ResumableShuffle
from nfcv.errors import ConfigError, DataError

LOADER = Path(__file__).resolve().parents[1] / "benchmarks" / "loader.py"


def _npy(tmp_path: Path, n: int = 40, shape=(3, 4, 6)) -> tuple[NpyImages, np.ndarray]:
    x = np.random.default_rng(3).integers(0, 256, (n, *shape), dtype=np.uint8)
    path = tmp_path / "images.npy"
    np.save(path, x)
    return NpyImages(path, torch.arange(n) * 10), x


class OneByOne(Dataset):
    """The dataset as it was read before batched reads: ``dataset[i]`` for every index."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_contiguous_runs():
    assert contiguous_runs([7, 3, 4, 5, 9, 4]) == [(3, 3), (7, 1), (9, 1)]
    assert contiguous_runs([]) == []
    assert contiguous_runs(range(5, 10)) == [(5, 5)]


def test_read_many_is_the_rows_asked_for_in_their_order(tmp_path):
    source, x = _npy(tmp_path)
    for idx in ([5, 6, 7, 8], [9, 2, 3, 4, 30, 2], [39, 0], [17], list(range(40))[::-1]):
        np.testing.assert_array_equal(source.read_many(idx).numpy(), x[idx])
    np.testing.assert_array_equal(source.read(39).numpy(), x[39])
    assert source.read_many([]).shape == (0, 3, 4, 6)


def test_batched_reads_take_one_read_per_run_of_rows(tmp_path, monkeypatch):
    source, x = _npy(tmp_path)
    calls = []
    name = "preadv" if hasattr(os, "preadv") else "pread"
    real = getattr(os, name)
    monkeypatch.setattr(os, name, lambda *a: calls.append(a) or real(*a))
    source.read_many(range(8, 24))  # an evaluation batch: one read
    assert len(calls) == 1
    calls.clear()
    source.read_many([12, 3, 4, 5, 13, 30])  # runs 3-5, 12-13, 30
    assert len(calls) == 3


@pytest.mark.parametrize("num_bits, hflip", [(8, False), (5, True)])
def test_loader_batches_equal_one_read_per_image(tmp_path, num_bits, hflip):
    """The DataLoader now calls `__getitems__` with each batch's indices: the batches (images,
    flips, labels, order) are exactly those of reading image by image."""
    source, _ = _npy(tmp_path)
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(1))[:30]
    ds = IndexedImages(source, indices, num_bits=num_bits, hflip=hflip)
    assert hasattr(ds, "__getitems__")

    def batches(dataset):
        torch.manual_seed(0)  # the flips' coin
        sampler = ResumableShuffle(len(dataset), seed=4)
        loader = DataLoader(dataset, batch_size=7, sampler=sampler, drop_last=True)
        return [b for _ in range(2) for b in loader]  # two epochs

    got, want = batches(ds), batches(OneByOne(ds))
    assert len(got) == len(want) == 8
    for (gx, gy), (wx, wy) in zip(got, want, strict=True):
        assert torch.equal(gx, wx) and torch.equal(gy, wy)
    if hflip:  # the flips happened: some images differ from their unflipped read
        flat = torch.cat([b[0] for b in got])
        assert flat.max() < 2**num_bits
    # and each sample is the image of its index, up to a flip
    x, y = ds.__getitems__([3, 4, 0])[2]
    raw = source.read(int(indices[0])) >> (8 - num_bits)
    assert torch.equal(x, raw) or torch.equal(x, raw.flip(-1))
    assert int(y) == int(indices[0]) * 10


def test_truncated_array_is_named_in_a_batched_read(tmp_path):
    source, x = _npy(tmp_path)
    with open(source.path, "r+b") as f:
        f.truncate(source.offset + 10 * source.row + 5)
    with pytest.raises(DataError, match="truncated"):
        source.read_many([8, 9, 10])


@pytest.mark.parametrize(
    "setting, device, pinned",
    [
        (None, "cpu", False),
        (None, "cuda", True),
        (None, "cuda:1", True),
        (None, None, False),
        (False, "cuda", False),
        (True, "cpu", True),
    ],
)
def test_pin_memory_decision(setting, device, pinned):
    assert base.resolve_pin_memory(setting, device) is pinned


def test_loaders_pin_memory_when_the_trainer_is_on_cuda(tmp_path):
    import lightning as L

    dm = instantiate(nfcv.compose(["data.num_workers=0"]).data)
    assert dm.pin_memory is None
    dm.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert not dm.pins_memory() and not dm.train_dataloader().pin_memory
    # A trainer on CUDA (its device is all the module reads): the loaders pin.
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm.pins_memory()
    assert dm.train_dataloader().pin_memory and dm.val_dataloader().pin_memory
    # nfcv-eval sets the device it evaluates on; data.pin_memory=false wins
    dm.trainer = None
    dm.device = torch.device("cuda")
    assert dm.eval_loader("test").pin_memory
    off = instantiate(nfcv.compose(["data.num_workers=0", "data.pin_memory=false"]).data)
    off.device = torch.device("cuda")
    assert not off.eval_loader("test").pin_memory


@pytest.mark.parametrize(
    "cpus, processes, workers", [(16, 1, 8), (16, 4, 3), (6, 1, 5), (2, 1, 1), (1, 1, 0)]
)
def test_auto_workers_from_the_cpus_available(monkeypatch, cpus, processes, workers):
    monkeypatch.setattr(base, "available_cpus", lambda: cpus)
    assert base.resolve_num_workers("auto", processes) == workers
    assert base.resolve_num_workers(3, processes) == 3  # a number is taken as it is


def test_available_cpus_is_the_affinity_mask():
    if hasattr(os, "sched_getaffinity"):
        assert base.available_cpus() == len(os.sched_getaffinity(0))
    assert base.available_cpus() >= 1


def test_num_workers_auto_in_config_and_explicit_numbers_win(monkeypatch):
    monkeypatch.setattr(base, "available_cpus", lambda: 5)
    cfg = nfcv.compose(["data=imagenet64"])
    assert cfg.data.num_workers == "auto"
    assert instantiate(cfg.data).loader_workers() == 4
    dm = instantiate(nfcv.compose(["data=imagenet64", "data.num_workers=2"]).data)
    assert dm.loader_workers() == 2
    # shared between the trainer's processes on the machine
    auto = instantiate(cfg.data)
    auto.trainer = SimpleNamespace(num_devices=2)
    assert auto.loader_workers() == 1
    with pytest.raises(ConfigError, match="auto"):
        nfcv.compose(["data.num_workers=many"])
    with pytest.raises(DataError, match="auto"):
        base.resolve_num_workers(-1)


def test_loader_benchmark_runs_on_a_tiny_size(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(LOADER.parent))
    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "unused"))  # the script sets its own
    import loader

    out = tmp_path / "loader.json"
    args = ["--imagenet-images=60", "--celeba-images=24", "--batch-size=4", "--batches=2"]
    args += ["--skip=1", "--workers", "0", "--dir", str(tmp_path / "work"), "--out", str(out)]
    rows = loader.main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["dataset", "workers", "batch", "img/s", "img/s/worker"]
    printed = [line.split() for line in lines[1:]]
    assert [r[:3] for r in printed] == [["imagenet64", "0", "4"], ["celeba64", "0", "4"]]
    assert all(float(r[3]) > 0 and r[3] == r[4] for r in printed)
    record = json.loads(out.read_text())
    assert record["rows"] == rows and [r["images"] for r in rows] == [8, 8]
    assert rows[1]["image_shape"] == [3, 64, 64]
    # the data it wrote is in the formats nfcv reads
    assert (tmp_path / "work" / "data" / "imagenet64" / "train_data_batch_10.npz").is_file()
    assert (tmp_path / "work" / "data" / "celeba" / "list_eval_partition.txt").is_file()
