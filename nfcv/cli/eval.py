"""nfcv-eval: bits per dim of one or more checkpoints over a whole data split.

For each checkpoint: the mean bits per dim with its standard error, the breakdown into latent
levels, log-determinant and dequantization (`nfcv.evaluate`), optionally one CSV row per image;
a checkpoint trained with Gaussian noise (``dequant=gaussian``) is labelled as what its figure
is, the continuous bits per dim of the noised images, never as a discrete bound;
for several checkpoints also one comparison table, with each one's difference from the first
and the paired standard error of that difference (same images, same noise).
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

import nfcv
from nfcv.checkpoint import load_checkpoint
from nfcv.cli.common import (
    checkpoints_arg,
    data_module,
    device_arg,
    ema_arg,
    int_arg,
)
from nfcv.data.files import atomic_path, atomic_write_text, check_output
from nfcv.errors import ConfigError, user_errors
from nfcv.evaluate import SplitEvaluation, evaluate_split
from nfcv.training.runs import run_dir_of, run_label


def _default_json(ckpt: Path, split: str, data_name: str | None) -> Path:
    tag = f"{data_name}-{split}" if data_name else split
    return ckpt.with_name(f"{ckpt.stem}.eval-{tag}.json")


# What nfcv-eval writes, and how it recognises its own files: it rewrites those and refuses to
# replace anything else (a user's file given as out=).
CSV_HEADER = ["index", "label", "bpd"]
JSON_KEYS = ({"checkpoint", "bpd", "nfcv_version"}, {"comparison", "results"})
EVAL_JSON = "an nfcv-eval JSON result"
EVAL_CSV = f"an nfcv-eval per-image CSV (header {','.join(CSV_HEADER)})"


def is_eval_json(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return isinstance(data, dict) and any(keys <= data.keys() for keys in JSON_KEYS)


def is_eval_csv(path: Path) -> bool:
    try:
        with open(path, newline="") as f:
            return next(csv.reader(f), None) == CSV_HEADER
    except (OSError, ValueError, csv.Error):
        return False


def write_per_image_csv(path: Path, result: SplitEvaluation) -> None:
    """One row per image: index in the split, label (empty without one), bits per dim.

    Values are written with ``repr`` (all 17 digits), so the mean of the column is the reported
    bits per dim to float64 rounding. Written atomically; an existing file that is not such a
    CSV is refused.
    """
    labels = result.labels.tolist() if result.labels is not None else None
    with atomic_path(path, is_eval_csv, EVAL_CSV) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_HEADER)
        for i, value in enumerate(result.bpd.tolist()):
            writer.writerow([i, "" if labels is None else labels[i], repr(value)])


def write_json(path: Path, record: dict) -> None:
    """`record` as JSON, atomically; an existing file that is not nfcv-eval's is refused."""
    atomic_write_text(path, json.dumps(record, indent=2) + "\n", is_eval_json, EVAL_JSON)


def format_breakdown(rows: list[dict], total: float) -> str:
    """The breakdown as an aligned text table, its parts summing to `total`."""
    width = max(len(r["part"]) for r in rows) + 2
    lines = [f"  {'part':<{width}}{'dims':>8}{'bits/dim':>11}{'bits/own dim':>14}"]
    for r in rows:
        dims = str(r.get("dims", ""))
        own = f"{r['bits_per_own_dim']:.4f}" if "bits_per_own_dim" in r else ""
        lines.append(f"  {r['part']:<{width}}{dims:>8}{r['bpd']:>11.4f}{own:>14}")
    lines.append(f"  {'total':<{width}}{'':>8}{total:>11.4f}")
    return "\n".join(lines)


def evaluate_checkpoint(cfg: DictConfig, ckpt: Path, label: str) -> tuple[dict, SplitEvaluation]:
    """Evaluate one checkpoint as `cfg` says; returns its JSON record and per-image results."""
    device = device_arg(cfg.device)
    k, batch_size, seed = int_arg(cfg, "k"), int_arg(cfg, "batch_size"), int_arg(cfg, "seed", 0)
    loaded = load_checkpoint(ckpt, map_location=device, ema=ema_arg(cfg))
    model = loaded.model
    if k > 1 and not model.discrete_bound:
        raise ConfigError(
            f"k={k}: importance samples tighten a bound on the discrete likelihood, and {ckpt} "
            "was trained with Gaussian noise (dequant=gaussian: its figure is the continuous "
            "density of the noised images, with no bound to tighten): use k=1"
        )
    datamodule = data_module(cfg, loaded, batch_size=batch_size)
    datamodule.device = torch.device(device)  # pinned batches when evaluating on CUDA
    loader = datamodule.eval_loader(cfg.split)

    # The dequantization noise comes from the global RNG: the same seed gives the same figure,
    # and every checkpoint of a comparison sees the same noise stream. Seeded after the loader's
    # iterator exists (making it draws a worker seed), so the figure is exactly that of
    # ``torch.manual_seed(seed)`` then `bits_per_dim` over the batches in order.
    batches = iter(loader)
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = evaluate_split(
        model,
        batches,
        k=k,
        device=device,
        progress=bool(cfg.progress),
        total=len(loader.dataset),
        desc=label[:40],
    )
    record = {
        "checkpoint": str(ckpt),
        "label": label,
        "model": loaded.config.model.get("name"),
        "trained_on": loaded.config.data.get("name"),
        "data": datamodule.describe(),
        "split": cfg.split,
        "num_images": result.num_images,
        "k": k,
        "seed": seed,
        "ema": loaded.uses_ema,
        "bpd": result.mean(),
        "bpd_stderr": result.stderr(),
        # What "bpd" is: a bound on the discrete likelihood, or (a model trained with Gaussian
        # noise) the continuous density of the noised images.
        "discrete_bound": model.discrete_bound,
        "figure": model.figure(),
        "breakdown": result.breakdown(),
        "seconds": round(time.perf_counter() - start, 2),
        "nfcv_version": nfcv.__version__,
    }
    if model.noise_std is not None:
        record["noise_std"] = model.noise_std
    # Same data as in training? Comparable only for the same dataset (not data=... OOD scores).
    trained = loaded.data_info.get("files", {}).get("sha256")
    now = (record["data"].get("files") or {}).get("sha256")
    if trained and now and record["data"].get("name") == record["trained_on"]:
        record["same_files_as_training"] = trained == now
        if trained != now:
            print(
                f"nfcv: warning: the {record['trained_on']} files read now (sha256 {now[:12]}) "
                f"differ from those the checkpoint was trained on ({trained[:12]}): the figure "
                "is not comparable with the run's own",
                file=sys.stderr,
            )
    return record, result


def _paired(a: SplitEvaluation, b: SplitEvaluation) -> tuple[float, float]:
    """Mean of b - a over the same images and its standard error."""
    diff = b.bpd - a.bpd
    n = diff.numel()
    se = (diff.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan
    return diff.mean().item(), se


def comparison_table(records: list[dict], results: list[SplitEvaluation]) -> list[dict]:
    """One row per checkpoint; the difference from the first where both scored the same
    images (same data, split and count)."""
    rows = []
    for i, (rec, res) in enumerate(zip(records, results, strict=True)):
        row = {
            "index": i,
            "label": rec["label"],
            "checkpoint": rec["checkpoint"],
            "model": rec["model"],
            "data": rec["data"]["name"],
            "ema": rec["ema"],
            "bpd": rec["bpd"],
            "bpd_stderr": rec["bpd_stderr"],
        }
        first = records[0]
        # A continuous figure (Gaussian noise) and a discrete bound are different quantities.
        same = (rec["data"]["name"], rec["num_images"], rec.get("figure")) == (
            first["data"]["name"],
            first["num_images"],
            first.get("figure"),
        )
        row["discrete_bound"] = rec.get("discrete_bound", True)
        if i > 0 and same:
            row["diff_vs_first"], row["diff_stderr"] = _paired(results[0], res)
        rows.append(row)
    return rows


def format_comparison(rows: list[dict]) -> str:
    width = min(60, max(len(r["label"]) for r in rows)) + 2
    head = f"  {'#':<3}{'run':<{width}}{'model':<8}{'data':<15}{'ema':<5}"
    lines = [head + f"{'bpd':>9}{'+/-':>9}{'diff vs #0':>12}{'+/-':>9}"]
    for r in rows:
        diff = ""
        if "diff_vs_first" in r:
            diff = f"{r['diff_vs_first']:>+12.4f}{r['diff_stderr']:>9.4f}"
        lines.append(
            f"  {r['index']:<3}{r['label'][: width - 2]:<{width}}{str(r['model']):<8}"
            f"{r['data']:<15}{'yes' if r['ema'] else 'no':<5}{r['bpd']:>9.4f}"
            f"{r['bpd_stderr']:>9.4f}{diff}"
            + ("" if r.get("discrete_bound", True) else "  (continuous)")
        )
    if not all(r.get("discrete_bound", True) for r in rows):
        lines.append(
            "  (continuous): trained with Gaussian noise; its figure is the continuous bits per "
            "dim of the noised images, not a discrete bits-per-dim bound (see its JSON)"
        )
    return "\n".join(lines)


def evaluate(cfg: DictConfig) -> dict:
    """Run nfcv-eval; returns what it wrote as JSON (one checkpoint's record, or with several,
    ``{"comparison": rows, "results": records}``)."""
    ckpts = checkpoints_arg(cfg)
    if cfg.split not in ("train", "val", "test"):
        raise ConfigError(f"unknown split={cfg.split!r}: use train, val or test")
    data_name = cfg.data.get("name") if cfg.get("data") is not None else None
    labels = [f"{run_label(run_dir_of(c))} [{c.stem}]" for c in ckpts]
    outs = [_default_json(ckpt, cfg.split, data_name) for ckpt in ckpts]
    if len(ckpts) == 1 and cfg.out:
        outs = [Path(cfg.out)]
    tag = f"{data_name}-{cfg.split}" if data_name else cfg.split
    comparison = Path(cfg.out) if cfg.out else Path(f"nfcv-eval-{tag}-comparison.json")
    # Every file to be written is checked before any evaluation: a folder, or a file that is
    # not an earlier result of nfcv-eval, fails now rather than after an hour of evaluating.
    for out in outs:
        check_output(out, is_eval_json, EVAL_JSON)
        if cfg.per_image:
            check_output(out.with_suffix(".csv"), is_eval_csv, EVAL_CSV)
    if len(ckpts) > 1:
        check_output(comparison, is_eval_json, EVAL_JSON)
    records, results = [], []
    for ckpt, label, out in zip(ckpts, labels, outs, strict=True):
        record, result = evaluate_checkpoint(cfg, ckpt, label)
        if cfg.per_image:
            csv_path = out.with_suffix(".csv")
            write_per_image_csv(csv_path, result)
            record["per_image_csv"] = str(csv_path)
        write_json(out, record)
        records.append(record)
        results.append(result)
        weights = "EMA weights" if record["ema"] else "weights"
        units = "bits/dim" if record["discrete_bound"] else record["figure"]
        print(
            f"nfcv: {record['model']} ({weights} of {ckpt}) on {record['data']['name']} "
            f"{cfg.split} ({record['num_images']} images, k={record['k']}): "
            f"{record['bpd']:.4f} +/- {record['bpd_stderr']:.4f} {units}\n"
            f"{format_breakdown(record['breakdown'], record['bpd'])}\n"
            f"  json: {out}" + (f"\n  csv:  {record['per_image_csv']}" if cfg.per_image else "")
        )
    if len(ckpts) == 1:
        return records[0]
    rows = comparison_table(records, results)
    summary = {"split": cfg.split, "k": records[0]["k"], "comparison": rows, "results": records}
    write_json(comparison, summary)
    print(f"\nnfcv: {len(ckpts)} checkpoints\n{format_comparison(rows)}\n  json: {comparison}")
    return summary


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
