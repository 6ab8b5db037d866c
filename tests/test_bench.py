"""The speed benchmark (benchmarks/bench.py): its FLOP count against a hand count, the command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"
sys.path.insert(0, str(BENCH.parent))
import bench  # noqa: E402


def glow_forward_macs(c: int, h: int, width: int, k: int, levels: int) -> int:
    """Multiply-accumulates of one image through Glow, counted by hand from the architecture:
    per level, squeeze to (C, H); per step the 1x1 conv (C^2 per pixel, plus its weight
    P @ L @ U: 2 C^3 once), the coupling network conv3x3 C/2 -> W, conv1x1 W -> W, conv3x3
    W -> C (shift and scale for C/2 channels); then the split prior's conv3x3 C/2 -> C, except
    at the last level (a learned per-channel prior: no conv)."""
    total = 0
    channels, size = c, h
    for level in range(levels):
        channels, size = channels * 4, size // 2
        pixels = size * size
        half = channels // 2
        per_pixel = channels * channels + 9 * half * width + width * width + 9 * width * channels
        total += k * (per_pixel * pixels + 2 * channels**3)
        if level < levels - 1:
            total += 9 * half * channels * pixels
            channels = half
    return total


def test_glow_flops_match_a_hand_count():
    size = bench.SIZES["tiny"]
    row = bench.measure("glow", "tiny", warmup=0, repeats=2)
    c, h, _ = size["shape"]
    macs = glow_forward_macs(c, h, size["width"], size["K"], size["L"])
    assert row["forward_gflop_per_img"] * 1e9 == pytest.approx(2 * macs, rel=1e-9)
    # A training step: forward, and backward for the inputs and the weights (about 3x).
    ratio = row["train_gflop_per_img"] / row["forward_gflop_per_img"]
    assert 2.0 < ratio < 3.5, ratio
    for key in ("train_img_per_s", "sample_img_per_s", "matmul_gflop_per_s"):
        assert row[key] > 0, (key, row)
    # The median of per-repeat ratios: near the ratio of the medians, not equal to it.
    ratio_of_medians = row["achieved_gflop_per_s"] / row["matmul_gflop_per_s"]
    assert 0.5 * ratio_of_medians < row["flop_utilisation"] < 2 * ratio_of_medians


def test_glow_training_flops_are_three_forward_passes():
    """A training step counts each product three times (forward, input gradient, weight
    gradient): exactly 3x the forward count, less the one product autograd skips per 1x1 conv
    (the gradient of its fixed permutation matrix P in P @ L @ U, 2 C^3). A counted product
    that is not one of the model's (a bias gradient as `ones @ dz`, an `mm`) would show here.
    The rows path's bias gradients are `mv`s, which FlopCounterMode does not count: were a
    later torch to count them, this test would say so."""
    model, x, optimizer = bench.build("glow", "tiny", torch.device("cpu"), None)
    step = bench.train_step_fn(model, x, "fp32", optimizer)
    step()  # actnorm init
    train = bench.count_flops(step)
    with torch.no_grad():
        forward = bench.count_flops(lambda: model.transform(x.float() / model.num_bins))
    size = bench.SIZES["tiny"]
    channels = [size["shape"][0] * 4 ** (level + 1) // 2**level for level in range(size["L"])]
    skipped = sum(size["K"] * 2 * c**3 for c in channels)
    assert train == 3 * forward - skipped, (train, forward, skipped)


def test_products_replay_counts_the_steps_flops():
    """`--products` replays a training step's counted operations alone: the replay makes the
    same calls (products, convolutions; forward and backward), so it counts exactly the
    step's FLOPs, on tensors of the same layouts, and nothing else runs."""
    model, x, optimizer = bench.build("glow", "tiny", torch.device("cpu"), None)
    step = bench.train_step_fn(model, x, "fp32", optimizer)
    step()  # actnorm init
    calls = bench.record_products(step)
    names = {str(func.overloadpacket) for func, _, _ in calls}
    assert "aten.mm" in names and "aten.convolution" in names, names
    replay = bench.products_replay(calls)
    assert bench.count_flops(replay) == bench.count_flops(step)
    params = [p.clone() for p in model.parameters()]
    replay()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))


def test_paper_size_flops_are_glows():
    """The `paper` size is the paper's CIFAR-10 layout at K=8: 3x32x32, width 512, L=3; the
    benchmark's model there counts what the hand count says (about 2 GFLOP per image)."""
    size = bench.SIZES["paper"]
    model, x, _ = bench.build("glow", "paper", torch.device("cpu"), batch=1)
    model.eval()
    with torch.no_grad():
        flops = bench.count_flops(lambda: model.transform(x.float() / model.num_bins))
    macs = glow_forward_macs(*size["shape"][:2], size["width"], size["K"], size["L"])
    assert flops == 2 * macs
    assert 1.8e9 < flops < 2.4e9


def test_benchmark_command_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--presets",
            "glow,nice",
            "--sizes",
            "tiny",
            "--warmup",
            "0",
            "--repeats",
            "2",
            "--checkpoint-grads",
            "both",
            "--products",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["preset"], r["checkpoint_grads"]) for r in rows] == [
        ("glow", False),
        ("nice", False),
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["peak_train_mib"] >= 0 and row["train_gflop_per_img"] > 0
        assert row["products_utilisation"] > 0
    for column in ("train img/s", "products util", "glow"):
        assert column in proc.stdout, proc.stdout


def test_benchmark_rejects_unknown_names():
    def bench_cli(*args):
        return subprocess.run(
            [sys.executable, str(BENCH), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    proc = bench_cli("--sizes", "huge")
    assert proc.returncode == 2 and "unknown size 'huge'" in proc.stderr
    proc = bench_cli("--repeats", "1")
    assert proc.returncode == 2 and "--repeats must be at least 2" in proc.stderr


def test_the_gpu_check_dry_runs_on_the_cpu(tmp_path):
    """scripts/gpu_check.py (the prepared GPU script of issue 18) runs end to end on a CPU at a
    tiny size and writes its rows: device, one training row per precision, the round trip."""
    out = tmp_path / "gpu.json"
    script = Path(__file__).parents[1] / "scripts" / "gpu_check.py"
    cmd = [sys.executable, str(script), "--device", "cpu", "--size", "tiny", "--steps", "1"]
    done = subprocess.run(
        [*cmd, "--no-compile", "--no-ddp", "--out", str(out)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == ["device", "train", "train", "round_trip_and_sampling"]
    assert rows[0]["matmul_flops_fp32_ieee"] > 0
    assert {r["dtype"] for r in rows[1:3]} == {"fp32", "bf16"}
    assert all(r["images_per_second"] > 0 and r["flops_per_image"] > 0 for r in rows[1:3])
    assert rows[3]["max_abs_round_trip_error_tf32_on"] < 1e-4
