"""One trainer per run folder.

Two ``nfcv-train`` processes in one run folder (the same ``hydra.run.dir`` twice, a job started
again while its first instance still runs) would both train and write their checkpoints over
each other's. `hold_run_folder` takes an exclusive, non-blocking `fcntl.flock` on
``RUN/.lock`` for the whole of `train()`; a second trainer is refused with an `OutputError`
naming the holder, whose pid, host and start time the lock file records.

The lock is the kernel's, not the file: it goes when its holder exits in any way (a crash,
SIGKILL, a preempted job), so a requeued job continuing with ``resume=auto`` takes it again at
once; a stale record in the file means nothing. The other ranks of a distributed run (started
again by Lightning's DDP launcher, torchrun or srun in the folder that rank 0 holds) do not take
it. Where `fcntl` does not exist (Windows) nothing is locked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from nfcv.errors import OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("nfcv")
LOCK_FILE = ".lock"
# Set by the launchers of distributed runs in the processes of ranks other than 0 (Lightning's
# DDP subprocess launcher sets LOCAL_RANK and NODE_RANK; torchrun RANK, LOCAL_RANK, GROUP_RANK;
# SLURM's srun SLURM_PROCID).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_rank_zero() -> bool:
    """Whether this process is (or will be) rank 0 of its run, read from the environment that
    launchers set before the script starts (the process group does not exist yet)."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


@contextlib.contextmanager
def hold_run_folder(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `run_dir` for the block: an `OutputError` naming the holder if another process holds
    it. A no-op in ranks other than 0 and where `fcntl` is missing."""
    if fcntl is None or not is_rank_zero():
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    # Opened without truncating: the holder's record stays readable until the lock is ours.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another open file: another process
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise OutputError(
                f"the run folder {Path(run_dir)} is in use: {holder} holds {path}. Two trainers "
                "in one folder would write their checkpoints over each other's: wait for it to "
                "end (resume=auto continues from its checkpoints), or train in another folder "
                "(hydra.run.dir=...)"
            ) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
            log.warning("nfcv: cannot lock %s (%s): the run folder is not protected", path, err)
        else:
            record = (
                f"nfcv-train pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, record.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
