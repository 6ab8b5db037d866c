"""One prepared GPU check: a CUDA training step of Glow and its speed, fp32 and bf16.

    python scripts/gpu_check.py --out gpu_check.json            # on the GPU machine
    python scripts/gpu_check.py --device cpu --steps 2 --size tiny   # a dry run anywhere

Random integer images stand in for CIFAR-10 (speed does not depend on pixel values). Prints and
writes JSON: images per second for training (forward, backward, Adam step) and sampling, peak
memory, and the bpd of one batch under bf16 autocast against fp32 with the same weights.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import nfcv

SIZES = {
    # name: (overrides, batch)
    "paper": (["experiment=glow_cifar10", "model.steps=8"], 64),
    "tiny": (["model.hidden=8", "model.steps=1"], 16),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(size: str, device: torch.device, steps: int, dtype: str) -> dict:
    overrides, batch = SIZES[size]
    cfg = nfcv.compose(overrides)
    model = nfcv.build_model(cfg).to(device).train()
    c, h, w = model.image_shape
    x = torch.randint(0, model.num_bins, (batch, c, h, w), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 2):  # two warm-up steps (ActNorm init, kernel selection)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            loss = model.bits_per_dim(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        bpd32 = model.bits_per_dim(x).mean().item()
        torch.manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bpd16 = model.bits_per_dim(x).mean().item()
        _sync(device)
        start = time.perf_counter()
        model.sample(batch)
        _sync(device)
        sample_s = time.perf_counter() - start
    step_s = sorted(times)[len(times) // 2]
    return {
        "size": size,
        "dtype": dtype,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch,
        "train_images_per_second": batch / step_s,
        "sample_images_per_second": batch / sample_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
        if device.type == "cuda"
        else None,
        "bpd_fp32": bpd32,
        "bpd_bf16_autocast": bpd16,
        "loss_finite": bool(torch.isfinite(loss)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="paper", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = [measure(args.size, device, args.steps, dt) for dt in ("fp32", "bf16")]
    for r in results:
        print(json.dumps(r))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
