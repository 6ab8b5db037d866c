"""Lightning's EMAWeightAveraging against nfcv's EMA (decay warm-up), on the same run.

    python benchmarks/ema_ab.py [STEPS] [DECAY]

Trains the default digits Glow twice from the same seed, once with nfcv's `ema.decay=DECAY`
(decay ramped up as min(decay, (1 + n) / (10 + n))) and once with Lightning's
`EMAWeightAveraging(decay=DECAY)` (a fixed decay from the first step), and prints the test bits
per dim each run reports for its averaged weights (both test the averaged weights).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import EMAWeightAveraging

import nfcv
from nfcv.training.run import train


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    decay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.999
    base = [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.enable_progress_bar=false",
        f"sample.every_n_steps={steps}",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, callbacks in (
            ("nfcv EMA (warm-up)", [*base, f"ema.decay={decay}"], []),
            ("Lightning EMAWeightAveraging", base, [EMAWeightAveraging(decay=decay)]),
            ("no average", base, []),
        ):
            start = time.perf_counter()
            summary = train(nfcv.compose(overrides), Path(tmp) / name.split()[0], callbacks)
            if "test_bpd" not in summary:
                raise SystemExit(f"{name}: the run stopped at step {summary.get('steps')}")
            rows.append((name, summary["test_bpd"], time.perf_counter() - start))
    print(f"\n{steps} steps, decay {decay}: test bits per dim of the weights each run tests")
    for name, bpd, seconds in rows:
        print(f"  {name:<32} {bpd:.4f}   ({seconds:.0f} s)")
    # A fixed decay from the first step keeps decay**n of the first weights in the average.
    print(f"  share of the first step's weights in a fixed-decay average: {decay**steps:.1%}")


if __name__ == "__main__":
    main()
