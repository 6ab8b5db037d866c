"""Source files: where data lives, checks and checksums computed once and cached under
``$NFCV_CACHE``, and the record of the files a run read."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nfcv.errors import DataError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NO_LABEL = -1  # the label of images of datasets without classes
LIST_FILES_UP_TO = 20  # describe() lists each file's sha256 up to this many files


def default_cache() -> Path:
    """``$NFCV_CACHE``, else ``~/.cache/nfcv``: staged, converted and checksum files."""
    return Path(os.environ.get("NFCV_CACHE", Path.home() / ".cache" / "nfcv")).expanduser()

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
