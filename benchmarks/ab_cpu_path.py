"""A/B of the CPU fast path on the Fashion-MNIST Glow experiment, end to end, in one process.

A ("fast"):  GlowNet as matrix products (`nets.USE_GEMM = True`) and the 1x1 convs as einsum
             (`conv1x1._mix_channels` as shipped): everything as today.
B ("plain"): GlowNet as convolutions (`nets.USE_GEMM = False`) and the 1x1 convs through
             `F.conv2d` (`conv1x1._mix_channels` monkeypatched here, nowhere else).

The training is the real one: `nfcv.cli.train.train` (what `nfcv-train` calls) on
``experiment=glow_fashion_mnist`` with its data module, Lightning Trainer, callbacks, gradient
clipping, guard and fused Adam. A callback switches the variant at block boundaries and times
every step as the interval between consecutive ``on_train_batch_end`` calls, so a step's time
includes loading its batch (num_workers 0), forward, backward, clipping, the optimizer step,
logging and the other callbacks. Validation, sample grids and the sanity check are moved out of
the run (they are not training steps), and the run is stopped after the last block (no test).

Schedule: `--warmup` steps of A then of B (not counted), then `--rounds` rounds of one block of
`--block` steps per variant, the order alternating AB, BA, AB, ... so that drift in the
machine's load falls on both. Reported: each block's median ms/step; per variant the
min/median/max of the block medians and images/s at the median; B/A (the fast path's speed-up)
as the ratio of the variants' medians and per round.

glibc's malloc setting (`keep_freed_memory`) is process-wide and cannot be undone inside a
process, so it is a command-line choice here: run the script once with each value and compare
across the two processes (``--keep-freed-memory true`` gives A as shipped; ``false`` gives B as
the plain configuration).

    python benchmarks/ab_cpu_path.py --root /work/shared/data/fashion-mnist \
        --keep-freed-memory true --json ab-keep.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

import nfcv
from nfcv.cli.train import train
from nfcv.flows import conv1x1, nets

_EINSUM_MIX = conv1x1._mix_channels


def _conv2d_mix(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 1x1 convolution through F.conv2d on every device (the plain path)."""
    return F.conv2d(x, w[:, :, None, None])


def set_variant(name: str) -> None:
    fast = name == "A"
    nets.USE_GEMM = fast
    conv1x1._mix_channels = _EINSUM_MIX if fast else _conv2d_mix


class _Finished(Exception):
    """Raised after the last block: ends the run without the test pass."""


def _cpu_stall_us() -> int | None:
    """Microseconds in which some runnable task waited for a CPU (Linux PSI), or None."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except OSError:
        return None
    return int(line.rsplit("total=", 1)[1])


class ABSwitch(L.Callback):
    """Switches the variant at block boundaries and times each step: wall-clock and the
    process's CPU time between consecutive ``on_train_batch_end`` calls. Per block also the
    machine's CPU pressure (the share of the block's time in which some runnable task, this
    process's or another's, waited for a CPU): other work on the machine shows there."""

    def __init__(self, schedule: list[tuple[str, int, bool]]):
        self.schedule = schedule  # (variant, steps, counted)
        self.blocks: list[dict] = []
        self._i = 0
        self._left = 0
        self._t = self._cpu = 0.0
        self._block_t = 0.0
        self._block_stall: int | None = None

    def _start_block(self) -> None:
        name, steps, counted = self.schedule[self._i]
        set_variant(name)
        self._left = steps
        self.blocks.append({"variant": name, "counted": counted, "ms": [], "cpu_ms": []})
        self._block_t, self._block_stall = time.perf_counter(), _cpu_stall_us()

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_block()
        self._t, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        b = self.blocks[-1]
        b["ms"].append(1e3 * (now - self._t))
        b["cpu_ms"].append(1e3 * (cpu - self._cpu))
        self._left -= 1
        if self._left == 0:
            stall = _cpu_stall_us()
            if stall is not None and self._block_stall is not None:
                b["cpu_pressure"] = (stall - self._block_stall) / 1e6 / (now - self._block_t)
            tag = "" if b["counted"] else " (warm-up)"
            pressure = b.get("cpu_pressure")
            print(
                f"  block {len(self.blocks):2d} {b['variant']}: median "
                f"{statistics.median(b['ms']):7.1f} ms/step (CPU "
                f"{statistics.median(b['cpu_ms']):6.1f} ms) over {len(b['ms'])} steps"
                + (f", CPU pressure {pressure:.0%}" if pressure is not None else "")
                + tag,
                flush=True,
            )
            self._i += 1
            if self._i == len(self.schedule):
                raise _Finished
            self._start_block()
        self._t, self._cpu = time.perf_counter(), time.process_time()


def check_paths(cfg) -> dict:
    """Both variants on one batch of a fresh model (its weights moved off their zero init): the
    loss and gradients agree, and each variant runs the code it should (GlowNet's row path under
    A only). The model and its random draws are separate from the timed run's."""
    from nfcv.api import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    x = torch.randint(0, 256, (64, 1, 28, 28)).float()
    counts = {}
    rows, convs = nets.GlowNet._forward_rows, nets.GlowNet._forward_convs
    out = {}
    try:
        set_variant("A")
        model.bits_per_dim(x)  # the actnorms' data-dependent init
        with torch.no_grad():  # off the zero init (whose gradients are mostly exactly 0)
            for q in model.parameters():
                q.add_(0.01 * torch.randn_like(q))
        for name in ("A", "B"):
            set_variant(name)
            seen = {"rows": 0, "convs": 0}

            def r(self, h, _seen=seen):
                _seen["rows"] += 1
                return rows(self, h)

            def c(self, h, _seen=seen):
                _seen["convs"] += 1
                return convs(self, h)

            nets.GlowNet._forward_rows, nets.GlowNet._forward_convs = r, c
            model.zero_grad()
            torch.manual_seed(1)  # the same dequantization noise
            loss = model.bits_per_dim(x).mean()
            loss.backward()
            out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
            counts[name] = seen
    finally:
        nets.GlowNet._forward_rows, nets.GlowNet._forward_convs = rows, convs
    (la, ga), (lb, gb) = out["A"], out["B"]
    rel = max(
        float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(ga, gb, strict=True)
    )
    return {
        "loss_A": float(la),
        "loss_B": float(lb),
        "max_rel_grad_diff": rel,
        "glownet_calls": counts,
    }


def _stats(values: list[float], batch: int) -> dict:
    med = statistics.median(values)
    return {
        "min_ms": round(min(values), 1),
        "median_ms": round(med, 1),
        "max_ms": round(max(values), 1),
        "img_per_s_at_median": round(1e3 * batch / med, 1),
    }


def summarise(blocks: list[dict], batch: int, quiet: float) -> dict:
    """Per variant the spread of the block medians (wall-clock and CPU time a step); B/A as the
    ratio of the variants' medians and per round (the two blocks of a round are adjacent in
    time). The same over the rounds whose two blocks both had CPU pressure <= `quiet`."""
    counted = [b for b in blocks if b["counted"]]
    rounds = [{b["variant"]: b for b in counted[i : i + 2]} for i in range(0, len(counted), 2)]
    res: dict = {}
    for label, sel in (
        ("all", rounds),
        (
            f"quiet (CPU pressure <= {quiet:.0%})",
            [r for r in rounds if all(b.get("cpu_pressure", 0.0) <= quiet for b in r.values())],
        ),
    ):
        part: dict = {"rounds": len(sel)}
        if sel:
            for key in ("ms", "cpu_ms"):
                meds = {v: [statistics.median(r[v][key]) for r in sel] for v in ("A", "B")}
                per_round = [b / a for a, b in zip(meds["A"], meds["B"], strict=True)]
                part[key] = {
                    "A": {**_stats(meds["A"], batch), "blocks": [round(m, 1) for m in meds["A"]]},
                    "B": {**_stats(meds["B"], batch), "blocks": [round(m, 1) for m in meds["B"]]},
                    "speedup_of_medians": round(
                        statistics.median(meds["B"]) / statistics.median(meds["A"]), 3
                    ),
                    "speedup_per_round": [round(x, 3) for x in per_round],
                    "speedup_median_of_rounds": round(statistics.median(per_round), 3),
                }
        res[label] = part
    return res


def _report(res: dict) -> None:
    for label, part in res.items():
        print(f"{label}: {part['rounds']} rounds")
        for key, what in (("ms", "wall-clock"), ("cpu_ms", "process CPU time")):
            if key not in part:
                continue
            print(f"  {what} per step:")
            for v, name in (("A", "fast (gemm, einsum)"), ("B", "plain (convs, conv2d)")):
                s = part[key][v]
                print(
                    f"    {v} {name:22s} min {s['min_ms']:7.1f} / median {s['median_ms']:7.1f}"
                    f" / max {s['max_ms']:7.1f} ms  ({s['img_per_s_at_median']:.0f} img/s at "
                    f"the median); blocks {s['blocks']}"
                )
            p = part[key]
            print(
                f"    speed-up of the fast path (B/A): {p['speedup_of_medians']:.3f}x of the "
                f"medians, {p['speedup_median_of_rounds']:.3f}x median of rounds "
                f"{p['speedup_per_round']}"
            )


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="Fashion-MNIST folder (the four .gz files)")
    p.add_argument("--keep-freed-memory", choices=("true", "false"), default="true")
    p.add_argument("--warmup", type=int, default=10, help="steps of each variant, not counted")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=10, help="steps per block")
    p.add_argument(
        "--quiet",
        type=float,
        default=0.2,
        help="also summarise the rounds whose blocks had at most this CPU pressure",
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="more config overrides")
    args = p.parse_args(argv)

    schedule = [("A", args.warmup, False), ("B", args.warmup, False)]
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        schedule += [(v, args.block, True) for v in order]
    total = sum(s for _, s, _ in schedule)

    cfg = nfcv.compose(
        [
            "experiment=glow_fashion_mnist",
            f"data.root={args.root}",
            f"keep_freed_memory={args.keep_freed_memory}",
            f"trainer.max_steps={total + 10}",
            # Not training steps: out of the timed run.
            "trainer.val_check_interval=1000000",
            "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false",
            "sample.every_n_steps=0",
            *args.overrides,
        ]
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}; keep_freed_memory="
        f"{args.keep_freed_memory}; {total} steps: {args.warmup}+{args.warmup} warm-up, "
        f"{args.rounds} rounds x {args.block} steps per variant",
        flush=True,
    )
    check = check_paths(cfg)
    print(f"paths agree: {check}", flush=True)
    switch = ABSwitch(schedule)
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="nfcv-ab-") as run_dir,
        contextlib.suppress(_Finished),
    ):
        train(cfg, run_dir=Path(run_dir), callbacks=[switch])
    set_variant("A")
    if len(switch.blocks) != len(schedule) or len(switch.blocks[-1]["ms"]) != schedule[-1][1]:
        sys.exit("the run ended before the schedule did")
    res = summarise(switch.blocks, int(cfg.data.batch_size), args.quiet)
    _report(res)
    res.update(
        keep_freed_memory=args.keep_freed_memory == "true",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        wall_s=round(time.perf_counter() - start, 1),
        check=check,
        blocks=[
            {
                "variant": b["variant"],
                "counted": b["counted"],
                "cpu_pressure": b.get("cpu_pressure"),
                "ms": [round(t, 2) for t in b["ms"]],
                "cpu_ms": [round(t, 2) for t in b["cpu_ms"]],
            }
            for b in switch.blocks
        ],
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
