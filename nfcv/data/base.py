"""`ImageDataModule`, the Lightning data module every dataset derives from, and
`LocalDataModule` for datasets read from files under ``data.root``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from nfcv.data.files import SPLITS, check_files, files_record
from nfcv.data.images import (
    ImagePreprocess,
    ImageSource,
    ImageTensorDataset,
    IndexedImages,
    Split,
    check_num_bits,
    reduce_bits,
)
from nfcv.data.samplers import ResumableShuffle, ShardedSequential
from nfcv.errors import DataError

MAX_AUTO_WORKERS = 8  # `num_workers: auto` never starts more loader processes than this


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what a scheduler such as SLURM or a
    container gave it, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def resolve_num_workers(setting: int | str, processes: int = 1) -> int:
    """DataLoader workers for ``data.num_workers``: a number is taken as it is; ``auto`` shares
    the available CPUs between the `processes` training processes of this machine and keeps
    one CPU of each share for the process itself, at most `MAX_AUTO_WORKERS` (2 CPUs, 1
    process: 1 worker; 1 CPU: 0, loading in the training process)."""
    if isinstance(setting, str) and setting.strip().lower() == "auto":
        share = available_cpus() // max(1, int(processes))
        return max(0, min(MAX_AUTO_WORKERS, share - 1))
    if isinstance(setting, bool) or int(setting) != setting or int(setting) < 0:
        raise DataError(
            f"data.num_workers={setting!r}: use an integer >= 0 (0: load in the main process) "
            "or auto"
        )
    return int(setting)


def resolve_pin_memory(setting: bool | None, device: torch.device | str | None) -> bool:
    """Whether loaders pin their batches (page-locked memory, so the copy to a GPU is
    asynchronous and faster): ``data.pin_memory`` when set, else (null) exactly when the data
    goes to a CUDA device."""
    if setting is not None:
        return bool(setting)
    return device is not None and torch.device(device).type == "cuda"


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
        num_workers: int | str = 0,
        hflip: bool = False,
        name: str | None = None,
        num_bits: int | None = None,
        checksum: bool = True,
        shuffle_seed: int | None = None,
        pin_memory: bool | None = None,
    ):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_bins = int(num_bins)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.val_size = None if val_size is None else int(val_size)
        self.split_seed = int(split_seed)
        # An integer, or "auto": resolved when a loader is made (`loader_workers`), once the
        # number of training processes on this machine is known.
        resolve_num_workers(num_workers)  # a bad value fails now
        self.num_workers = num_workers
        # None: pin exactly when the trainer's (or `device`'s) device is CUDA (`pins_memory`).
        self.pin_memory = None if pin_memory is None else bool(pin_memory)
        self.device: torch.device | None = None  # where evaluation without a trainer runs
        self.hflip = bool(hflip)
        # Checked here, for every dataset: data read on demand (IndexedImages) is never range
        # checked pixel by pixel, and a shift by 8 - 9 made every image zero.
        self.num_bits = None if num_bits is None else check_num_bits(num_bits)
        self.checksum = bool(checksum)
        # The training order is drawn from (shuffle_seed, epoch); None: torch's initial seed.
        self.shuffle_seed = None if shuffle_seed is None else int(shuffle_seed)
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

    def _trainer_or_none(self):
        try:
            return self.trainer  # set by Lightning when a Trainer uses this module
        except (AttributeError, RuntimeError):
            return None

    def target_device(self) -> torch.device | None:
        """Where the batches go: the attached trainer's device, else `device` (set by
        nfcv-eval), else unknown (None)."""
        trainer = self._trainer_or_none()
        if trainer is not None:
            return trainer.strategy.root_device
        return self.device

    def loader_workers(self) -> int:
        """``data.num_workers`` resolved: ``auto`` shares this machine's CPUs between the
        trainer's processes on it (its devices per node)."""
        trainer = self._trainer_or_none()
        processes = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
        return resolve_num_workers(self.num_workers, processes)

    def pins_memory(self) -> bool:
        return resolve_pin_memory(self.pin_memory, self.target_device())

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        # Our own samplers (nfcv/resume.py): a training order drawn from (seed, epoch) that a
        # resumed run can continue mid-epoch, and evaluation shards without padding, both split
        # between the ranks of a distributed run. The loader's own generator keeps it from
        # drawing from the global RNG, which the training steps' noise comes from.
        seed = torch.initial_seed() if self.shuffle_seed is None else self.shuffle_seed
        n = len(dataset)
        sampler = ResumableShuffle(n, seed=seed) if shuffle else ShardedSequential(n)
        workers = self.loader_workers()
        # Batches are read whole: the loader hands each batch's indices to the dataset's
        # `__getitems__` where it has one (images read with `ImageSource.read_many`).
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pins_memory(),
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


# ---------------------------------------------------------------------------------------------
# Datasets read from files under data.root


def torchvision_datasets():
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
