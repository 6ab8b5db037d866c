"""TarFlow sampling with and without the key/value cache, side by side in one run.

    python benchmarks/tarflow_cache.py                      # Fashion-MNIST size, this CPU
    python benchmarks/tarflow_cache.py --device cuda --n 256 --out cache.json

The model is `experiment=tarflow_fashion_mnist`'s (28x28, patch 4: 49 tokens of 16 values, 4
blocks of 2 layers, width 128), untrained (seed 0, its weights moved off the identity start so
every block computes something; speed does not depend on the weights). Each repeat draws `n`
samples with the cache (each step runs the transformer on one new token and attends over the
cached keys and values) and then without it (each step reruns the block on the whole prefix),
from the same noise; the figures are the medians over the repeats, and the two results must
agree (the same inverse). The issue's bar: cached at least 10x faster than cache-free.
Small batches are bound by the per-step overhead of both loops (each runs N - 1 steps of the
same operations), so the ratio grows with `n`: on a shared 2-core CPU (1 thread) 5.4x at
n=16, 11.7x at n=64, 12.8x at n=256.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import nfcv
from nfcv.flows import TarFlowBlock


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: torch.device, overrides: list[str]):
    torch.manual_seed(0)
    cfg = nfcv.compose(["experiment=tarflow_fashion_mnist", *overrides])
    model = nfcv.build_model(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, cfg


def set_cache(model, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, TarFlowBlock):
            m.kv_cache = enabled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=64, help="samples drawn per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.width=256")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model, cfg = build(device, args.overrides)
    blocks = [m for m in model.modules() if isinstance(m, TarFlowBlock)]
    tokens = blocks[0].num_tokens
    gen = torch.Generator(device=device).manual_seed(1)
    eps = torch.randn(args.n, model.dim, generator=gen, device=device)

    def run(enabled: bool) -> tuple[float, torch.Tensor]:
        set_cache(model, enabled)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            x = model.inverse(eps)
        _sync(device)
        return time.perf_counter() - start, x

    for _ in range(args.warmup):
        run(True)
        run(False)
    cached, plain = [], []
    for _ in range(args.repeats):
        t, x_cached = run(True)
        cached.append(t)
        t, x_plain = run(False)
        plain.append(t)
    set_cache(model, True)
    diff = (x_cached - x_plain).abs().max().item()
    result = {
        "model": "experiment=tarflow_fashion_mnist " + " ".join(args.overrides),
        "tokens": tokens,
        "blocks": len(blocks),
        "n": args.n,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "cached_s": statistics.median(cached),
        "cache_free_s": statistics.median(plain),
        "cached_img_per_s": args.n / statistics.median(cached),
        "cache_free_img_per_s": args.n / statistics.median(plain),
        "speedup": statistics.median(p / c for p, c in zip(plain, cached, strict=True)),
        "max_abs_difference": diff,
    }
    print(
        f"TarFlow {tokens} tokens x {len(blocks)} blocks, {args.n} samples on {device} "
        f"({torch.get_num_threads()} threads), median of {args.repeats}:\n"
        f"  cached:     {result['cached_s']:.3f} s  ({result['cached_img_per_s']:.1f} img/s)\n"
        f"  cache-free: {result['cache_free_s']:.3f} s  ({result['cache_free_img_per_s']:.1f} "
        f"img/s)\n"
        f"  speedup:    {result['speedup']:.1f}x   (max |cached - cache-free| = {diff:.1e})"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if diff < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
