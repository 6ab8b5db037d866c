"""No host synchronisation in a training step (issue 18).

On a GPU every device-to-host read (``.item()``, ``bool(tensor)``, ``.cpu()``, a data-dependent
shape) waits for the queue of kernels to drain. These tests count such reads in training steps
with a dispatch mode. On this CPU-only machine every tensor stands for device memory except
explicit host copies (``.to("cpu", copy=True)``) and what is computed from them alone; a copy
to the host counts as a read.

- The model's step (forward, backward, optimizer step) of every preset: no read at all, once
  the data-dependent initialisations have run (first step).
- A step of the real Lightning Trainer with nfcv's callbacks and the progress bar: at most one
  read (the numerical guard's decision) on steps that do not write logs.
"""

from __future__ import annotations

import contextlib
import traceback
import weakref

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nfcv
from nfcv.training.module import FlowModule

aten = torch.ops.aten
READS = {
    aten._local_scalar_dense.default,  # .item(), bool(t), float(t), int(t), if t:
    aten.equal.default,
    aten.is_nonzero.default,
    aten.nonzero.default,  # data-dependent output shapes
    aten.masked_select.default,
    aten._unique2.default,
}


def _where() -> str:
    frames = traceback.extract_stack(limit=14)[:-3]
    return " < ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:7])


class HostReads(TorchDispatchMode):
    """Records every device-to-host read while active (with where it came from). `host`: the
    ids of tensors known to be host copies, shared between counters over several steps."""

    def __init__(self, host: set[int] | None = None):
        super().__init__()
        self.reads: list[str] = []
        self.float64: list[str] = []  # ops that computed in float64 (slow on most GPUs)
        self._host: set[int] = host if host is not None else set()

    def _mark_host(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self._host:
                self._host.add(id(t))
                weakref.finalize(t, self._host.discard, id(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_host = bool(tensors) and all(id(t) in self._host for t in tensors)
        # A copy to the host: ``.to("cpu")``. (A cast's backward names the device too, but it
        # changes the dtype and stays where it is.)
        to_host = (
            func is aten._to_copy.default
            and str(kwargs.get("device")) == "cpu"
            and kwargs.get("dtype") in (None, args[0].dtype)
        )
        if (func in READS or to_host) and not on_host:
            frames = traceback.extract_stack(limit=12)[:-2]
            self.reads.append(
                f"{func}: "
                + " < ".join(
                    f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in frames[::-1][:6]
                )
            )
        if to_host or on_host:
            self._mark_host(out)
        elif any(
            isinstance(t, torch.Tensor) and t.dtype in (torch.float64, torch.complex128)
            for t in tree_leaves(out)
        ):
            self.float64.append(f"{func}: {_where()}")
        return out


# Every preset at a small size (the data-dependent and label paths included), and Glow with each
# of the catalogue's couplings and linear flows that a preset can select.
GLOW = ["model=glow", "model.hidden=4", "model.steps=1"]
NICE = ["model=nice", "model.hidden=8", "model.layers=1"]
FLOWPP = ["model=flowpp", "model.scales=[[0,2],[2,1]]", "model.hidden=8", "model.blocks=1"]
FLOWPP += ["model.components=2", "model.heads=2"]
VARIATIONAL = ["dequant=variational", "dequant.num_steps=2", "dequant.context_channels=4"]
VARIATIONAL += ["dequant.context_blocks=1", "dequant.coupling.num_components=2"]
VARIATIONAL += ["dequant.coupling.net.hidden_channels=8", "dequant.coupling.net.heads=2"]
PRESETS = {
    "glow": GLOW,
    "glow_conditional": [*GLOW, "model.conditional=true", "model.num_classes=10"],
    "nice": NICE,
    "nice_full_linear": [*NICE, "model.linear=full_linear"],
    "realnvp": ["model=realnvp", "model.hidden=4", "model.blocks=1"],
    "flowpp": FLOWPP,
    "flowpp_variational": [*FLOWPP, *VARIATIONAL],
    "maf": ["model=maf", "model.hidden=4", "model.steps=1"],
    "hint": ["model=hint", "model.hidden=4", "model.steps=1"],
    "tarflow": ["model=tarflow", "model.width=16", "model.head_dim=8", "model.blocks=2"],
    "tarflow_conditional": [
        *["model=tarflow", "model.width=16", "model.head_dim=8", "model.blocks=2"],
        *["model.conditional=true", "model.num_classes=10"],
    ],
    "jet": ["model=jet", "model.couplings=3", "model.width=8", "model.heads=2"],
    "resflow": ["model=resflow", "model.blocks=[1,1]", "model.hidden=8", "model.fc_blocks=1"],
    **{f"glow_{c}": [*GLOW, f"model.coupling={c}"] for c in ("spline", "naf", "mixlogcdf")},
    **{f"glow_{p}": [*GLOW, f"model.permutation={p}"] for p in ("plain", "emerging", "periodic")},
}
# Not here: `ffjord`. Its ODE solver (torchdiffeq) decides its step sizes on the host: an
# adaptive solve reads its error estimate at every step, by design.


def _model_step_reads(overrides: list[str], steps: int = 2) -> HostReads:
    cfg = nfcv.compose(["data=digits", *overrides])
    module = FlowModule(OmegaConf.to_container(cfg, resolve=True))
    optimizer = module.configure_optimizers()["optimizer"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (8, 1, 8, 8), generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    counter = HostReads()
    for step in range(steps):  # the first step runs the data-dependent initialisations
        with counter if step == steps - 1 else contextlib.nullcontext():
            loss = module._bpd((x, y), check=False).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return counter


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_training_step_reads_nothing_on_the_host_and_computes_nothing_in_float64(name):
    counter = _model_step_reads(PRESETS[name])
    reads, f64 = counter.reads, counter.float64
    assert not reads, f"{len(reads)} device-to-host reads in a training step:\n" + "\n".join(reads)
    assert not f64, f"{len(f64)} float64 ops in a training step:\n" + "\n".join(f64[:10])


def test_the_counter_sees_host_reads():
    """The dispatch mode catches the reads this file is about (else the tests above pass
    vacuously)."""
    x = torch.randn(4)
    with HostReads() as counter:
        bool(x.sum() > 0)
        x.max().item()
        x.nonzero()
        y = x.to("cpu", copy=True)  # a copy to the host counts; reading it afterwards does not
        y.sum().item()
    assert len(counter.reads) == 4, counter.reads


class _Probe(L.Callback):
    """Counts reads from the start of each training batch to the start of the next (so the
    progress bar, the loggers and every callback's hooks are inside)."""

    def __init__(self):
        self.counter: HostReads | None = None
        self.per_step: dict[int, list[str]] = {}
        self.host: set[int] = set()

    def _close(self, step: int) -> None:
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.per_step[step] = self.counter.reads
            self.counter = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(trainer.global_step)
        self.counter = HostReads(self.host)
        self.counter.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._close(trainer.global_step)


def test_a_lightning_training_step_reads_the_host_at_most_once(tmp_path, tiny, monkeypatch):
    """The real Trainer with nfcv's callbacks (guard, EMA, samples, checkpoints, throughput) and
    the progress bar: one read per step (the guard's decision), except on the steps that write
    logs, validate or save."""
    from nfcv.training.run import train

    probe = _Probe()
    init = L.Trainer.__init__

    def with_probe(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), probe]
        init(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", with_probe)
    overrides = tiny(
        **{
            "trainer.max_steps": "14",
            "trainer.log_every_n_steps": "5",
            "trainer.val_check_interval": "12",
            "trainer.enable_progress_bar": "true",
            "sample.every_n_steps": "12",
            "ema.decay": "0.9",
        }
    )
    train(nfcv.compose(overrides), run_dir=tmp_path / "run")
    # per_step[s]: from the start of step s - 1 to the start of step s. Steps 0 (checks and
    # initialisations), 4 and 9 (logs), 11 (validation, samples, checkpoint) do more.
    quiet = [s for s in probe.per_step if s - 1 not in (0, 4, 9, 11) and s >= 2]
    assert len(quiet) >= 8
    for s in quiet:
        reads = probe.per_step[s]
        assert len(reads) <= 1, f"step {s - 1}: {len(reads)} reads:\n" + "\n".join(reads)
    assert any(probe.per_step[s] for s in quiet), "the guard's one read was not seen"


def test_labels_out_of_range_are_refused_where_they_enter():
    """Label values are checked at the entry points (not in every training step): evaluation,
    log_weights, and a TarFlow's sampling, which would read a negative label as its null class."""
    from nfcv.evaluate import bits_per_dim_parts

    x = torch.randint(0, 17, (3, 1, 8, 8))
    bad = torch.tensor([0, 10, 3])
    glow = nfcv.build_model(nfcv.compose(["data=digits", *PRESETS["glow_conditional"]]))
    tarflow = nfcv.build_model(nfcv.compose(["data=digits", *PRESETS["tarflow_conditional"]]))
    for model in (glow, tarflow):
        for fn in (
            lambda m: m.bits_per_dim(x, labels=bad),
            lambda m: bits_per_dim_parts(m, x, labels=bad),
            lambda m: m.log_weights(x, labels=bad),
        ):
            with pytest.raises(ValueError, match=r"class indices in \[0, 9\]"):
                fn(model)
    for label in (-1, 10):
        with pytest.raises(ValueError, match=r"class indices in \[0, 9\]"):
            tarflow.sample(2, label=label)
