"""Silently wrong results and stray files: each case fails loudly or leaves nothing behind.

- ``data.num_bits`` outside 1..8 is refused by every data module at construction;
- staged copies of MNIST-family ``.gz`` files follow the content of the source, not its mtime;
- a run folder is held by one trainer at a time (``RUN/.lock``);
- ``checkpoints/last.ckpt`` that is a folder is refused before training;
- ``resume=auto`` on a truncated ``last.ckpt`` falls back to the newest good checkpoint;
- outputs (npz, safetensors, eval JSON/CSV, status, grids) are written atomically and never
  replace a file that is not nfcv's own output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate

import nfcv
from nfcv.errors import DataError, NfcvError


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Files in `folder` other than `keep` (temporary files a writer failed to remove)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------------------------------------
# 2. Staged MNIST-family .gz files follow the content


def test_staged_gz_follows_the_content_not_the_mtime(tmp_path, monkeypatch):
    from test_data import write_idx, write_mnist_like

    monkeypatch.setenv("NFCV_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "fashion"
    write_mnist_like(root, n_train=6, n_test=3, gz=True)
    overrides = ["data=fashion_mnist", f"data.root={root}", "data.val_size=2"]
    first = instantiate(nfcv.compose(overrides).data)
    first.setup("test")  # stages the four files

    # New content, modification time older than the staged copy: it must be staged again.
    test_gz = root / "t10k-images-idx3-ubyte.gz"
    new = np.random.default_rng(1).integers(0, 256, (3, 28, 28))
    write_idx(test_gz, new)
    os.utime(test_gz, (1_000_000, 1_000_000))
    dm = instantiate(nfcv.compose(overrides).data)
    np.testing.assert_array_equal(dm.split("test").images[:, 0].numpy(), new)

    # A truncated file, older than the staged copy: an error naming it, not the stale copy.
    train_gz = root / "train-images-idx3-ubyte.gz"
    train_gz.write_bytes(train_gz.read_bytes()[:-40])
    os.utime(train_gz, (1_000_000, 1_000_000))
    dm = instantiate(nfcv.compose(overrides).data)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------
# 6. Outputs: atomic, and never over a file that is not nfcv's


def _disk_full(*args, **kwargs):
    """Stands in for a writer on a full disk: writes part of the file, then fails."""
    values = (*args, *kwargs.values())
    target = next(a for a in values if isinstance(a, (str, Path)) or hasattr(a, "write"))
    if hasattr(target, "write"):
        target.write(b"PK\x03\x04 part of a file")
    else:
        Path(target).write_bytes(b"PK\x03\x04 part of a file")
    raise OSError(28, "No space left on device")


def test_sample_npz_on_a_full_disk_leaves_no_partial_file(tiny_run, tmp_path, monkeypatch):
    from nfcv.cli.sample import sample

    out = tmp_path / "samples" / "s.npz"
    cfg = nfcv.compose(
        [f"ckpt={tiny_run['best_ckpt']}", "mode=npz", "n=2", "device=cpu", f"out={out}"],
        config_name="sample",
    )
    sample(cfg)
    good = out.read_bytes()
    monkeypatch.setattr(np, "savez_compressed", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        sample(cfg)
    assert out.read_bytes() == good  # the previous output whole
    assert _leftovers(out.parent, {"s.npz"}) == []


def test_export_to_a_folder_is_refused_and_a_failed_export_leaves_nothing(
    tiny_run, tmp_path, monkeypatch
):
    import safetensors.torch

    from nfcv.checkpoint import export_safetensors

    folder = tmp_path / "weights"
    folder.mkdir()
    with pytest.raises(NfcvError, match=rf"{folder} is a folder"):
        export_safetensors(tiny_run["best_ckpt"], folder)
    assert _leftovers(tmp_path, {"weights"}) == [] and _leftovers(folder, set()) == []

    monkeypatch.setattr(safetensors.torch, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        export_safetensors(tiny_run["best_ckpt"], tmp_path / "m.safetensors")
    assert _leftovers(tmp_path, {"weights"}) == []


def test_eval_never_overwrites_a_file_that_is_not_its_own(tiny_run, tmp_path):
    from nfcv.cli.eval import evaluate

    out = tmp_path / "results.json"

    def cfg():
        return nfcv.compose(
            [
                "progress=false",
                f"ckpt={tiny_run['best_ckpt']}",
                "per_image=true",
                f"out={out}",
                "split=val",
            ],
            config_name="eval",
        )

    header = "index,label,bpd\n"  # nfcv's per-image CSV
    users_csv = tmp_path / "results.csv"
    users_csv.write_text("my notes\n")
    with pytest.raises(NfcvError, match=rf"{users_csv}.*not .*nfcv.*out=.*delete"):
        evaluate(cfg())
    assert users_csv.read_text() == "my notes\n" and not out.exists()
    users_csv.unlink()

    out.write_text('{"my": "results"}\n')
    with pytest.raises(NfcvError, match=rf"{out}.*not .*nfcv.*out=.*delete"):
        evaluate(cfg())
    assert out.read_text() == '{"my": "results"}\n' and not users_csv.exists()
    out.unlink()

    first = evaluate(cfg())  # nfcv's own outputs: rewritten by the next run
    assert users_csv.read_text().startswith(header)
    assert evaluate(cfg())["bpd"] == first["bpd"]
    assert json.loads(out.read_text())["bpd"] == first["bpd"]
    assert _leftovers(tmp_path, {"results.json", "results.csv"}) == []


def test_atomic_write_keeps_the_old_file_and_removes_its_temporary_on_failure(tmp_path):
    from nfcv.data.files import atomic_path, atomic_write_text, temporary_path

    path = tmp_path / "status.json"
    atomic_write_text(path, "old\n")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".json" and tmp != path
        tmp.write_text("new, half")
        raise RuntimeError("killed")
    assert path.read_text() == "old\n"
    assert _leftovers(tmp_path, {"status.json"}) == []
    # A temporary file left by a writer that was killed is removed by the next write.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    temporary_path(path, int(dead)).write_text("left")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and _leftovers(tmp_path, {"status.json"}) == []
