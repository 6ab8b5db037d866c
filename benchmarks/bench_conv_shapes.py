"""Forward + backward of single convolutions at a model's shapes, against a 2048 x 2048 matmul:
how much of the machine oneDNN's kernels reach at each shape, NCHW and channels-last.

    python scripts/bench_conv_shapes.py glow-paper       # Glow at the benchmark's paper size
    python scripts/bench_conv_shapes.py glow-cpu-small

Each shape: (in channels, out channels, kernel, height = width); FLOPs are 3 x the forward's
(input and weight gradients).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # batch, [(c_in, c_out, kernel, size)]: GlowNet's three convolutions per level
    "glow-cpu-small": (
        64,
        [
            (2, 128, 3, 14),
            (128, 128, 1, 14),
            (128, 4, 3, 14),
            (4, 128, 3, 7),
            (128, 128, 1, 7),
            (128, 8, 3, 7),
        ],
    ),
    "glow-paper": (
        16,
        [
            (6, 512, 3, 16),
            (512, 512, 1, 16),
            (512, 12, 3, 16),
            (12, 512, 3, 8),
            (512, 512, 1, 8),
            (512, 24, 3, 8),
            (24, 512, 3, 4),
            (512, 512, 1, 4),
            (512, 48, 3, 4),
        ],
    ),
}


def median_seconds(fn, repeats: int = 10) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(name: str) -> None:
    batch, shapes = SHAPES[name]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2 * 2048**3 / median_seconds(lambda: a @ b)
    print(f"matmul {matmul / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads")
    for layout in (torch.contiguous_format, torch.channels_last):
        total_s = total_flops = 0.0
        for c_in, c_out, k, size in shapes:
            x = torch.randn(batch, c_in, size, size).contiguous(memory_format=layout)
            x.requires_grad_(True)
            w = torch.randn(c_out, c_in, k, k, requires_grad=True)
            g = torch.randn(batch, c_out, size, size).contiguous(memory_format=layout)

            def step(x=x, w=w, g=g, k=k):
                F.conv2d(x, w, padding=k // 2).backward(g)

            seconds = median_seconds(step)
            flops = 3 * 2 * batch * size * size * c_in * c_out * k * k
            total_s += seconds
            total_flops += flops
            print(
                f"{layout} {c_in:>4} -> {c_out:<4} {k}x{k} at {size:>2}x{size:<2}: "
                f"{seconds * 1e3:6.2f} ms, utilisation {flops / seconds / matmul:.2f}"
            )
        print(f"{layout} all: utilisation {total_flops / total_s / matmul:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "glow-paper")
