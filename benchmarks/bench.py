"""Speed benchmark: how close training and sampling come to the machine's limit.

    python benchmarks/bench.py                              # every preset, both sizes, this CPU
    python benchmarks/bench.py --presets glow --sizes paper --out glow.json
    python benchmarks/bench.py --device cuda --dtype bf16 --batch 64     # on a GPU

For each preset at each named size it prints and writes as JSON:

- training images per second: one optimizer step is the model's bits per dim on a batch of
  random integer images (speed does not depend on the pixels), backward, gradient clipping and
  Adam, as `FlowModule` trains; Lightning's own per-step overhead is not included;
- sampling images per second: ``sample(64)`` in eval mode, and its time against one forward
  ``transform`` of 64 images timed right after it (``sample_over_transform``, the median of
  the pairs' ratios);
- peak training memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the growth of the
  process's peak resident memory over the training steps (each configuration runs in its own
  process, so peaks do not carry over);
- model FLOPs per image of a training step (forward + backward) and of a forward pass, counted
  with ``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions);
- FLOP utilisation: the training step's achieved FLOP/s over the FLOP/s of a 2048 x 2048 matrix
  product in the same dtype, with the same threads, in the same process: each timed step is
  followed by matrix products for as long, and the figure is the median over the repeats of
  each step's ratio to the products right after it (`timed_against_matmul`).

Every time is the median of ``--repeats`` timed repeats after ``--warmup`` untimed ones (at
least 2 repeats, fewer than asked once a section has run `BUDGET_S` seconds). Run it on an idle
machine: anything else on the cores shows up in every figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# name: (dataset config whose image shape it has, image shape, width, K, L, batch)
SIZES: dict[str, dict[str, Any]] = {
    "cpu-small": {
        "data": "fashion_mnist",
        "shape": [1, 28, 28],
        "width": 128,
        "K": 8,
        "L": 2,
        "batch": 64,
    },
    # For tests and dry runs only.
    "tiny": {"data": "digits", "shape": [1, 8, 8], "width": 8, "K": 2, "L": 2, "batch": 4},
    "paper": {"data": "cifar10", "shape": [3, 32, 32], "width": 512, "K": 8, "L": 3, "batch": 16},
}
PRESETS = ("glow", "realnvp", "nice", "flowpp", "tarflow", "jet")
SAMPLE_N = 64


def preset_overrides(preset: str, size: dict[str, Any]) -> list[str]:
    """How width, K (steps per level) and L (levels) map onto each preset's config.

    Glow: hidden channels, steps, levels (dropout 0, as in the paper). RealNVP: feature maps of
    the ResNets, scales = L; its steps per scale are the paper's (3 checkerboard + 3 channel),
    2 residual blocks per network. NICE: units of the MLPs, K couplings (it has no levels).
    Flow++: filters, the CIFAR-10 scales of the authors' code, 2 blocks, 4 components.
    TarFlow: the transformers' width, K blocks of 2 layers, heads of 32 channels (fewer when the
    width is smaller), patch 4 on 28x28 and larger images (Fashion-MNIST: 49 tokens), else 2.
    Jet: ViT width, K x L couplings of one block each, patch 4 (2 on images of 8 rows or fewer;
    channel-wise splits only where the grid of patches is odd, as experiment/jet_fashion_mnist).
    """
    w, k, levels = size["width"], size["K"], size["L"]
    if preset == "glow":
        return [
            f"model.hidden={w}",
            f"model.steps={k}",
            f"model.levels={levels}",
            "model.dropout=0",
        ]
    if preset == "realnvp":
        return [f"model.hidden={w}", f"model.scales={levels}", "model.blocks=2"]
    if preset == "nice":
        return [f"model.hidden={w}", f"model.couplings={k}"]
    if preset == "flowpp":
        return [f"model.hidden={w}", "model.blocks=2", "model.components=4"]
    if preset == "tarflow":
        patch = 4 if size["shape"][1] >= 28 else 2
        return [
            f"model.width={w}",
            f"model.head_dim={min(32, w)}",
            f"model.blocks={k}",
            "model.layers=2",
            f"model.patch_size={patch}",
        ]
    if preset == "jet":
        side = size["shape"][1]
        patch = 2 if side <= 8 else 4
        kinds = ["model.kinds=[channels]"] if (side // patch) % 2 else []
        sizes = [f"model.width={w}", f"model.couplings={k * levels}", f"model.patch_size={patch}"]
        return sizes + kinds
    raise ValueError(f"unknown preset {preset!r}: choose from {', '.join(PRESETS)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# A timed section stops adding repeats once it has run this long (and has 2): the paper-size
# RealNVP and Flow++ steps take tens of seconds on a CPU.
BUDGET_S = 30.0


def _repeat_timed(
    fn: Callable[[], Any],
    device: torch.device,
    warmup: int,
    repeats: int,
    budget_s: float = BUDGET_S,
    after: Callable[[float], None] | None = None,
) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` after `warmup` calls (fewer, but at least 2,
    once the repeats have taken `budget_s`); `after(seconds)` runs after each timed call."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
        if time.perf_counter() - start > budget_s:
            break
    _sync(device)
    times: list[float] = []
    while len(times) < max(repeats, 1) and not (len(times) >= 2 and sum(times) > budget_s):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
        if after is not None:
            after(times[-1])
    return times


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of `fn` (see `_repeat_timed`)."""
    return statistics.median(_repeat_timed(fn, device, warmup, repeats))


class Matmul:
    """The reference: a 2048 x 2048 by 2048 x 2048 matrix product (2 n^3 FLOPs) in `dtype`."""

    n = 2048

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.a = torch.randn(self.n, self.n, device=device, dtype=dtype)
        self.b = torch.randn(self.n, self.n, device=device, dtype=dtype)
        for _ in range(2):
            torch.mm(self.a, self.b)
        _sync(device)

    def rate(self, seconds: float = 0.0) -> float:
        """FLOP/s of back-to-back products for about `seconds` (at least one)."""
        start = time.perf_counter()
        count = 0
        while count == 0 or time.perf_counter() - start < seconds:
            torch.mm(self.a, self.b)
            _sync(self.device)
            count += 1
        return 2 * self.n**3 * count / (time.perf_counter() - start)


def timed_against_matmul(
    fn: Callable[[], Any],
    matmul: Matmul,
    warmup: int,
    repeats: int,
    budget_s: float = BUDGET_S,
) -> tuple[float, float, float]:
    """(median seconds of `fn`, median matmul FLOP/s, median of their per-repeat ratio).

    Each timed call of `fn` is followed by matrix products for as long as it took, and each
    repeat's utilisation divides by the products right after it: the machine's speed drifts
    (on this project's virtual machine by a quarter within seconds: turbo, neighbours), and a
    reference taken once, minutes apart, would move every utilisation with it."""
    rates: list[float] = []
    times = _repeat_timed(
        fn, matmul.device, warmup, repeats, budget_s, after=lambda t: rates.append(matmul.rate(t))
    )
    ratios = [1.0 / (t * r) for t, r in zip(times, rates, strict=True)]  # x work FLOPs: below
    return statistics.median(times), statistics.median(rates), statistics.median(ratios)


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@dataclasses.dataclass(frozen=True)
class _TensorMeta:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def record_products(fn: Callable[[], Any]) -> list[tuple[Any, tuple, dict]]:
    """The calls `fn` makes to the operations FlopCounterMode counts (matrix products and
    convolutions, forward and backward), in order, with each tensor argument replaced by its
    (shape, stride, dtype, device)."""
    from torch.utils import flop_counter
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_map

    counted = set(flop_counter.flop_registry)
    calls: list[tuple[Any, tuple, dict]] = []

    def meta(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            return _TensorMeta(tuple(a.shape), tuple(a.stride()), a.dtype, a.device)
        return a

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            if func in counted or func.overloadpacket in counted:
                calls.append((func, tree_map(meta, args), tree_map(meta, kwargs)))
            return func(*args, **kwargs)

    with Recorder():
        fn()
    return calls


def products_replay(calls: list[tuple[Any, tuple, dict]]) -> Callable[[], None]:
    """A function that makes the recorded calls again, on random tensors of the same shapes
    and strides (one set per distinct layout, made once): the step's products and nothing
    else."""
    from torch.utils._pytree import tree_map

    pool: dict[_TensorMeta, torch.Tensor] = {}

    def make(a: Any) -> Any:
        if not isinstance(a, _TensorMeta):
            return a
        if a not in pool:
            pairs = zip(a.shape, a.stride, strict=True)
            extent = 1 + sum((n - 1) * st for n, st in pairs) if all(a.shape) else 0
            base = torch.randn(extent, dtype=a.dtype, device=a.device)
            pool[a] = base.as_strided(a.shape, a.stride)
        return pool[a]

    ready = [(func, tree_map(make, args), tree_map(make, kwargs)) for func, args, kwargs in calls]

    def replay() -> None:
        for func, args, kwargs in ready:
            func(*args, **kwargs)

    return replay


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise OSError(f"{key} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the process's peak resident memory (VmHWM) to its current value (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(preset: str, size_name: str, device: torch.device, batch: int | None):
    """The preset's model at this size (seed 0), a batch of random integer images, and the
    config's optimizer (what `train_step_fn` builds, as training does)."""
    import nfcv

    size = SIZES[size_name]
    torch.manual_seed(0)
    cfg = nfcv.compose(
        [f"model={preset}", f"data={size['data']}", *preset_overrides(preset, size)]
    )
    model = nfcv.build_model(cfg).to(device)
    assert list(model.image_shape) == size["shape"], (model.image_shape, size)
    c, h, w = model.image_shape
    x = torch.randint(0, model.num_bins, (batch or size["batch"], c, h, w), device=device)
    return model, x, cfg.optim.optimizer


def _autocast(device: torch.device, dtype: str):
    low = torch.bfloat16 if dtype == "bf16" else None
    return torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None)


def train_step_fn(model, x: torch.Tensor, dtype: str, optimizer_cfg) -> Callable[[], None]:
    """One optimizer step as nfcv trains: bits per dim, backward, clipping, the optimizer of
    the default config (Adam) built as `nfcv.training.module.FlowModule` builds it."""
    from nfcv.training.module import build_optimizer

    opt = build_optimizer(optimizer_cfg, model.parameters())

    def step() -> None:
        with _autocast(x.device, dtype):
            loss = model.bits_per_dim(x, check=False).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_memory(
    preset: str,
    size_name: str,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batch: int | None = None,
    checkpoint_grads: bool = False,
    **_: Any,
) -> dict[str, Any]:
    """Peak memory of a training step above what is held between steps (weights, Adam's state),
    measured after a warm-up step. On a CPU: the growth of the peak resident memory; main()
    runs this with MALLOC_MMAP_THRESHOLD_ set, so that freed tensors leave the resident set."""
    dev = torch.device(device)
    model, x, optimizer_cfg = build(preset, size_name, dev, batch)
    if checkpoint_grads:
        model.checkpoint_networks(True)
    model.train()
    step = train_step_fn(model, x, dtype, optimizer_cfg)
    step()  # allocates Adam's state
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        step()
        return {"peak_train_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20}
    base = _status_mib("VmRSS")
    reset_peak_rss()
    step()
    return {"peak_train_mib": _status_mib("VmHWM") - base}


def measure(
    preset: str,
    size_name: str,
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    batch: int | None = None,
    checkpoint_grads: bool = False,
    warmup: int = 2,
    repeats: int = 5,
    products: bool = False,
) -> dict[str, Any]:
    """Speeds and FLOPs of one configuration, in this process. `products`: also the utilisation
    of the step's products alone (`products_replay`), the step's ceiling were everything else
    free."""
    dev = torch.device(device)
    model, x, optimizer_cfg = build(preset, size_name, dev, batch)
    batch = x.shape[0]
    if checkpoint_grads:
        model.checkpoint_networks(True)
    matmul = Matmul(dev, torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.train()
    train_step = train_step_fn(model, x, dtype, optimizer_cfg)
    train_s, reference, inverse_work = timed_against_matmul(train_step, matmul, warmup, repeats)
    # Per image, from a step on 2 images (the count is linear in the batch but for the 1x1
    # convs' weight products, a few C^3 per step): much faster than a full batch. Without
    # checkpointing, so that the figure is the model's, not the recomputation's too.
    n = min(2, batch)
    model.checkpoint_networks(False)
    train_flops = count_flops(train_step_fn(model, x[:n], dtype, optimizer_cfg)) / n

    model.eval()
    c, h, w = model.image_shape
    gen = torch.Generator(device=dev).manual_seed(0)
    y64 = (torch.randint(0, model.num_bins, (SAMPLE_N, c, h, w), device=dev) + 0.5) / (
        model.num_bins
    )
    with torch.no_grad():
        forward_flops = count_flops(lambda: model.transform(y64[:1]))

    def sample() -> None:
        with torch.no_grad(), _autocast(dev, dtype):
            model.sample(SAMPLE_N, temperature=0.7, generator=gen)

    def transform() -> None:
        with torch.no_grad(), _autocast(dev, dtype):
            model.transform(y64)

    # Alternately, each sample timed right before a transform: the ratio is the median of the
    # pairs' ratios, so that the machine's drift between two separate timings does not enter it.
    transform()  # its warm-up; the sample's is _repeat_timed's
    transform_times: list[float] = []

    def then_transform(_: float) -> None:
        transform_times.append(timed(transform, dev, 0, 1))

    sample_times = _repeat_timed(sample, dev, 1, repeats, after=then_transform)
    sample_s = statistics.median(sample_times)
    sample_ratio = statistics.median(
        s / t for s, t in zip(sample_times, transform_times, strict=True)
    )
    achieved = train_flops * batch / train_s
    utilisation = train_flops * batch * inverse_work  # median over repeats of achieved / matmul
    extra: dict[str, Any] = {}
    if products:
        model.train()
        replay = products_replay(record_products(train_step_fn(model, x, dtype, optimizer_cfg)))
        _, _, inverse = timed_against_matmul(replay, matmul, warmup, repeats)
        extra["products_utilisation"] = count_flops(replay) * inverse
    return {
        "preset": preset,
        "size": size_name,
        "batch": batch,
        "checkpoint_grads": checkpoint_grads,
        "dtype": dtype,
        "params": sum(p.numel() for p in model.parameters()),
        "train_img_per_s": batch / train_s,
        "train_step_s": train_s,
        "sample_img_per_s": SAMPLE_N / sample_s,
        "sample_over_transform": sample_ratio,
        "train_gflop_per_img": train_flops / 1e9,
        "forward_gflop_per_img": forward_flops / 1e9,
        "achieved_gflop_per_s": achieved / 1e9,
        "matmul_gflop_per_s": reference / 1e9,
        "flop_utilisation": utilisation,
        **extra,
    }


def _child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh Python process and return its row (or its error)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_ROW ")]
    if lines:
        return json.loads(lines[-1][len("BENCH_ROW ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {proc.returncode}: {tail[0]}"}


def machine(device: str) -> dict[str, Any]:
    info = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = f"{names[0]} x {len(names)}" if names else info["cpu"]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


COLUMNS = [
    ("preset", "preset", "{}"),
    ("size", "size", "{}"),
    ("batch", "batch", "{}"),
    ("ckpt", "checkpoint_grads", "{}"),
    ("train img/s", "train_img_per_s", "{:.1f}"),
    ("sample img/s", "sample_img_per_s", "{:.1f}"),
    ("sample/fwd", "sample_over_transform", "{:.2f}"),
    ("peak MiB", "peak_train_mib", "{:.0f}"),
    ("GFLOP/img", "train_gflop_per_img", "{:.3f}"),
    ("GFLOP/s", "achieved_gflop_per_s", "{:.1f}"),
    ("matmul GFLOP/s", "matmul_gflop_per_s", "{:.1f}"),
    ("util", "flop_utilisation", "{:.2f}"),
    ("products util", "products_utilisation", "{:.2f}"),
]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        cells.append(
            [fmt.format(row[k]) if k in row else "-" for _, k, fmt in COLUMNS]
            + ([row["error"]] if "error" in row else [])
        )
    widths = [max(len(h), 9) for h, _, _ in COLUMNS] + [0]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)) for r in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--sizes", default="cpu-small,paper", help=f"of {', '.join(SIZES)}")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=None, help="default: the size's batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="at least 2")
    parser.add_argument(
        "--checkpoint-grads",
        choices=("off", "on", "both"),
        default="both",
        help="gradient checkpointing of the coupling networks; `both`: also an `on` row at the "
        "paper size for the presets that have it (not NICE)",
    )
    parser.add_argument(
        "--products",
        action="store_true",
        help="also time the training step's matrix products and convolutions alone, replayed "
        "on random tensors of the same shapes: the utilisation the step would reach were "
        "everything else free (its ceiling with this library)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)

    if args.one is not None:  # one measurement, in this fresh process: print its row
        spec = json.loads(args.one)
        what = spec.pop("what")
        try:
            row = measure(**spec) if what == "speed" else measure_memory(**spec)
        except Exception as err:  # reported in the table; the other rows go on
            row = {"error": f"{type(err).__name__}: {err}"}
        print("BENCH_ROW " + json.dumps(row), flush=True)
        return 0

    if args.repeats < 2 or args.warmup < 0:
        parser.error("--repeats must be at least 2 and --warmup at least 0")
    presets = [p for p in args.presets.split(",") if p]
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            parser.error(f"unknown size {s!r}: choose from {', '.join(SIZES)}")
    for p in presets:
        if p not in PRESETS:
            parser.error(f"unknown preset {p!r}: choose from {', '.join(PRESETS)}")
    specs = []
    for size in sizes:
        for preset in presets:
            modes = {"off": [False], "on": [True], "both": [False]}[args.checkpoint_grads]
            if args.checkpoint_grads == "both" and size == "paper":
                modes.append(True)
            for ckpt in modes:
                if ckpt and preset == "nice":
                    continue  # NICE's vector couplings are not checkpointed
                specs.append(
                    {
                        "preset": preset,
                        "size_name": size,
                        "device": args.device,
                        "dtype": args.dtype,
                        "batch": args.batch,
                        "checkpoint_grads": ckpt,
                        "warmup": args.warmup,
                        "repeats": args.repeats,
                        **({"products": True} if args.products else {}),
                    }
                )
    rows = []
    info = machine(args.device)
    print(f"nfcv benchmark: {info}", flush=True)
    print(table([]), flush=True)
    for spec in specs:
        row = _child({**spec, "what": "speed"})
        if "error" not in row:
            # Its own process: a fresh peak, and malloc handing freed tensors back at once.
            row.update(_child({**spec, "what": "memory"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}))
        row = {
            "preset": spec["preset"],
            "size": spec["size_name"],
            "checkpoint_grads": spec["checkpoint_grads"],
            **row,
        }
        rows.append(row)
        print(table([row]).splitlines()[1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
