"""The prepared GPU check of issue 18: one script, one run, every figure in one JSON file.

    python scripts/gpu_check.py --out benchmarks/gpu-check.json          # on the GPU machine
    python scripts/gpu_check.py --device cpu --size tiny --steps 2 --no-ddp  # a dry run anywhere

For `experiment=glow_cifar10` (random integer images stand in for CIFAR-10: speed does not depend
on pixel values) it measures, in this order and in the same process:

- the device's matmul throughput (a large float32 and bf16 product), the reference for
  "fraction of the GPU's matmul throughput";
- training steps (forward, backward, Adam) in fp32 and under bf16 autocast, each eager and with
  the whole training forward compiled (what ``compile=true`` does): images/s, model FLOPs per
  image (`torch.utils.flop_counter`; nfcv's exact-precision 1x1 convolutions are not counted, a
  small share), the achieved fraction of the measured matmul throughput,
  peak memory, and device-to-host syncs per step (`torch.cuda.set_sync_debug_mode`);
- the round trip ``inverse(transform(x))`` with TF32 turned on for cuDNN and cuBLAS (the flow's
  own linear maps must stay exact), and sampling speed;
- a 1-GPU NCCL DDP run of `nfcv-train` (``trainer=ddp trainer.devices=1``, a few steps).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

import nfcv
from nfcv.flows import exact

SIZES = {
    # name: (overrides, batch)
    "paper": (["experiment=glow_cifar10"], 64),
    "tiny": (["model.hidden=8", "model.steps=1"], 16),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def matmul_throughput(device: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    """FLOP/s of an n x n product in `dtype` (float32 in IEEE precision)."""
    if device.type != "cuda":
        n = 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    with exact.full_precision():
        for _ in range(6):
            _sync(device)
            start = time.perf_counter()
            a @ b
            _sync(device)
            times.append(time.perf_counter() - start)
    return 2 * n**3 / _median(times[1:])


def _sync_counter(device: torch.device):
    """Counts CUDA synchronisations while active (warnings of the sync debug mode)."""
    if device.type != "cuda":
        return contextlib.nullcontext([])

    @contextlib.contextmanager
    def counting():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield caught
            finally:
                torch.cuda.set_sync_debug_mode("default")

    return counting()


def train_steps(size: str, device: torch.device, steps: int, dtype: str, compiled: bool) -> dict:
    overrides, batch = SIZES[size]
    torch.manual_seed(0)
    model = nfcv.build_model(nfcv.compose(overrides)).to(device).train()
    c, h, w = model.image_shape
    x = torch.randint(0, model.num_bins, (batch, c, h, w), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    model.bits_per_dim(x)  # the data-dependent initialisations, eagerly (as training does)

    def loss_fn(x):
        with autocast:
            return model.bits_per_dim(x, check=False).mean()

    step_fn = torch.compile(loss_fn) if compiled else loss_fn
    compile_start = time.perf_counter()
    for _ in range(3):  # warm-up: compilation, kernel selection
        loss = step_fn(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    warmup_s = time.perf_counter() - compile_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    with _sync_counter(device) as syncs:
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            loss = step_fn(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            times.append(time.perf_counter() - start)
    with FlopCounterMode(display=False) as flops:
        loss_fn(x).backward()
    step_s = _median(times)
    return {
        "what": "train",
        "size": size,
        "dtype": dtype,
        "compiled": compiled,
        "batch": batch,
        "images_per_second": batch / step_s,
        "step_ms": 1e3 * step_s,
        "warmup_s": warmup_s,
        "flops_per_image": flops.get_total_flops() / batch,
        "achieved_flops": flops.get_total_flops() / step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "syncs_per_step": len(syncs) / steps if device.type == "cuda" else None,
        "loss": loss.item(),
    }


def round_trip_and_sampling(size: str, device: torch.device) -> dict:
    overrides, batch = SIZES[size]
    torch.manual_seed(0)
    model = nfcv.build_model(nfcv.compose(overrides)).to(device).train()
    c, h, w = model.image_shape
    model.bits_per_dim(torch.randint(0, model.num_bins, (batch, c, h, w), device=device))
    with torch.no_grad():  # off the identity start, as a trained model is
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.eval()
    x = torch.rand(batch, c, h, w, device=device)
    saved = exact.precision_settings()
    errors = {}
    try:
        for setting in ("ieee", "tf32"):
            for _, backend in exact._SETTINGS:
                backend.fp32_precision = setting if setting == "ieee" else "tf32"
            with torch.no_grad():
                eps, _ = model.transform(x)
                errors[setting] = float((model.inverse(eps) - x).abs().max())
    finally:
        for name, backend in exact._SETTINGS:
            backend.fp32_precision = saved[name]
    with torch.no_grad():
        model.sample(batch)  # warm-up
        _sync(device)
        start = time.perf_counter()
        model.sample(batch)
        _sync(device)
        sample_s = time.perf_counter() - start
    return {
        "what": "round_trip_and_sampling",
        "size": size,
        "max_abs_round_trip_error_ieee": errors["ieee"],
        "max_abs_round_trip_error_tf32_on": errors["tf32"],
        "sample_images_per_second": batch / sample_s,
    }


def ddp_run(size: str, steps: int) -> dict:
    overrides, _ = SIZES[size]
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [
            sys.executable, "-m", "nfcv.cli.train", *overrides, "trainer=ddp",
            "trainer.devices=1", f"trainer.max_steps={steps}", "trainer.val_check_interval=1.0",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    summary = [line for line in done.stdout.splitlines() if line.startswith("nfcv:")]
    return {
        "what": "ddp_1gpu_nccl",
        "returncode": done.returncode,
        "wall_s": wall,
        "summary": summary,
        "stderr_tail": done.stderr[-2000:] if done.returncode else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="paper", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    results: list[dict] = []

    def record(row: dict) -> None:
        print(json.dumps(row), flush=True)
        results.append(row)
        with open(args.out, "w") as f:  # after every row: a run cut short keeps its figures
            json.dump(results, f, indent=2)

    record(
        {
            "what": "device",
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "matmul_flops_fp32_ieee": matmul_throughput(device, torch.float32),
            "matmul_flops_bf16": matmul_throughput(device, torch.bfloat16),
        }
    )
    peak = {"fp32": results[0]["matmul_flops_fp32_ieee"], "bf16": results[0]["matmul_flops_bf16"]}
    for dtype in ("fp32", "bf16"):
        for compiled in (False,) if args.no_compile else (False, True):
            row = train_steps(args.size, device, args.steps, dtype, compiled)
            row["fraction_of_matmul_throughput"] = row["achieved_flops"] / peak[dtype]
            record(row)
    record(round_trip_and_sampling(args.size, device))
    if not args.no_ddp:
        record(ddp_run(args.size, steps=10))


if __name__ == "__main__":
    main()
