"""Source files: where data lives, checks and checksums computed once and cached under
``$NFCV_CACHE``, and the record of the files a run read."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfcv.errors import DataError, OutputError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NO_LABEL = -1  # the label of images of datasets without classes
LIST_FILES_UP_TO = 20  # describe() lists each file's sha256 up to this many files


def default_cache() -> Path:
    """``$NFCV_CACHE``, else ``~/.cache/nfcv``: staged, converted and checksum files."""
    return Path(os.environ.get("NFCV_CACHE", Path.home() / ".cache" / "nfcv")).expanduser()

# ---------------------------------------------------------------------------------------------
# Atomic writes: every file nfcv writes (checkpoints, exports, samples, eval results, status,
# caches) goes through `atomic_path`. (Here, in the lowest layer that reads and writes files, so
# that data/, checkpoint.py, training/ and cli/ share one writer.)

_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temporary_path(path: Path, pid: int | None = None) -> Path:
    """Where `atomic_path` writes `path` first: a hidden file in the same folder (so the rename
    stays on one file system) that keeps the suffix (writers that pick the format from it, e.g.
    ``save_image``, and ``np.savez``, which appends ``.npz`` otherwise, see the real one), named
    after the writer's process and host."""
    pid = os.getpid() if pid is None else pid
    return path.with_name(f".{path.name}.tmp-{pid}-{_HOST}{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Remove the temporary files of `path` left by writers on this host that were killed."""
    for stale in path.parent.glob(glob.escape(f".{path.name}.tmp-") + "*"):
        pid = stale.name[len(f".{path.name}.tmp-") :].split("-", 1)[0]
        if (
            pid.isdigit()
            and int(pid) != os.getpid()
            and stale == temporary_path(path, int(pid))  # ours, of this host
            and not _alive(int(pid))
        ):
            stale.unlink(missing_ok=True)


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush file `path` to disk; a folder: the renames in it (a no-op where folders cannot be
    opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        if not directory:
            raise


def check_output(
    path: Path, ours: Callable[[Path], bool] | None = None, what: str = "a file"
) -> None:
    """Refuse (`OutputError`) to write `path` where it is a folder, or, given `ours`, an existing
    file for which ``ours(path)`` is false: not `what` written by nfcv; or where it cannot be
    written (under a file, in a folder without write permission)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{path} is a folder: pass the path of a file to write (e.g. {path / 'NAME'})"
        )
    if ours is not None and path.exists() and not ours(path):
        raise OutputError(
            f"refusing to overwrite {path}: it is not {what} written by nfcv. Pass another "
            "out=, or delete the file if you do not need it"
        )
    # The nearest folder above it that exists (atomic_path makes the missing ones) must be a
    # folder this process may write in: else the write fails after the work, not before it.
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: no permission to write in {folder}")


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, ours: Callable[[Path], bool] | None = None, what: str = "a file"
) -> Iterator[Path]:
    """``with atomic_path(path) as tmp:`` write the file `tmp`; when the block ends without an
    error, `tmp` is fsynced and renamed over `path` with `os.replace` (a reader sees the old file
    or the new one, never a part); on any error (a full disk, a kill by an exception) it is
    removed and `path` is left as it was. A failed write (`OSError`) is an `OutputError` naming
    `path`. Temporary files of killed writers are removed first. `check_output` runs first
    (`ours`, `what`).
    """
    path = Path(path)
    check_output(path, ours, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot write {path}: {err}") from err
    _remove_stale(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(f"cannot write {path}: {err}") from err
        raise
    _fsync(path.parent, directory=True)


def atomic_write_text(
    path: str | os.PathLike,
    text: str,
    ours: Callable[[Path], bool] | None = None,
    what: str = "a file",
) -> Path:
    """Write `text` to `path` through `atomic_path`; returns `path`."""
    path = Path(path)
    with atomic_path(path, ours, what) as tmp:
        tmp.write_text(text)
    return path


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


def is_image(path: Path) -> bool:
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
    # Atomic: concurrent runs never see half a file; a read-only cache only costs recomputing.
    record = {"dir": str(directory), "files": entries}
    with contextlib.suppress(OSError):
        atomic_write_text(_cache_path(directory), json.dumps(record))


def _inspect(path: Path, digest: bool) -> dict:
    """Read `path` once: its digests if asked, and a full decode if it is an image."""
    sha, md5 = hashlib.sha256(), hashlib.md5()
    image = is_image(path)
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
            and (not is_image(path) or "wh" in entry)
        )
        if not fresh:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
            entries[resolved.name] = entry
            if digest or is_image(path):
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
