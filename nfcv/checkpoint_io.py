"""Atomic checkpoint writes.

Lightning's `TorchCheckpointIO` serialises a checkpoint in memory and then writes it over the
file in place: a process killed during that write (SIGKILL, the node going down, the disk
filling up) leaves a truncated ``last.ckpt`` and the run has nothing to resume from.
`AtomicCheckpointIO` writes to a temporary file in the same folder, fsyncs it, and renames it over
the target with `os.replace`, which is atomic on POSIX and Windows: a reader sees the old file or
the new one, never a part. Temporary files left by killed writers are removed by the next save.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

_TMP = ".{name}.tmp-{pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` through a fsynced temporary file and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(_TMP.format(name=path.name, pid="*")):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)  # left by a writer that was killed
    tmp = path.parent / _TMP.format(name=path.name, pid=os.getpid())
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic (see the module docstring); paths with a
    scheme (``s3://...``) go through Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
