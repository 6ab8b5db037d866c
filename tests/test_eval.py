"""nfcv-eval: the per-part breakdown, the importance-weighted bound, per-image CSVs, scoring
another dataset, several checkpoints at once; the commands as subprocesses."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_bpd import SHAPE, FixedNoise, NormalQuantile
from test_cli import _fails, run

import nfcv
from nfcv.dequant import Dequantizer
from nfcv.errors import CheckpointError, ConfigError
from nfcv.evaluate import (
    DEQUANT,
    DISCRETE,
    IMPORTANCE,
    LOGDET,
    bits_per_dim_parts,
    evaluate_split,
)
from nfcv.flows import Flatten, Sequential
from nfcv.model import ImageFlow
from nfcv.training.runs import expand_checkpoints, run_checkpoint, run_label

TINY_VARIATIONAL = [
    "dequant=variational",
    "dequant.num_steps=1",
    "dequant.context_channels=4",
    "dequant.context_blocks=1",
    "dequant.coupling.num_components=2",
    "dequant.coupling.net.hidden_channels=8",
    "dequant.coupling.net.heads=2",
]


class SquaredUniform(Dequantizer):
    """u = r^2 with r ~ U(0, 1): density 1 / (2 sqrt(u)) on (0, 1), so log q(u|x) != 0 and
    varies with u, like a learned q; a valid dequantization (the bound stays a bound)."""

    def forward(self, x, num_bins):
        r = torch.rand_like(x).clamp_min(1e-6)
        u = r * r
        log_q = (-math.log(2) - 0.5 * torch.log(u)).flatten(1).sum(1)
        return (x + u) / num_bins, log_q


def _glow(*extra: str) -> ImageFlow:
    """A tiny 2-level Glow on digits shapes, off its identity start, in eval mode."""
    cfg = nfcv.compose(["model.hidden=8", "model.steps=1", "model.levels=2", *extra])
    model = nfcv.build_model(cfg)
    model.train()
    model.bits_per_dim(torch.randint(0, 17, (32, 1, 8, 8)))  # ActNorm's data init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _eval_cfg(*overrides: str):
    return nfcv.compose(["progress=false", *overrides], config_name="eval")


@pytest.fixture(scope="module")
def ckpt(tiny_run) -> Path:
    return Path(tiny_run["best_ckpt"])


# ---------------------------------------------------------------------------------------------
# The breakdown


@pytest.mark.parametrize("k", [1, 4])
def test_parts_sum_to_the_total_and_the_total_is_bits_per_dim(k):
    model = _glow()
    x = torch.randint(0, 17, (6, 1, 8, 8))
    torch.manual_seed(11)
    total, parts = bits_per_dim_parts(model, x, k=k)
    torch.testing.assert_close(sum(parts.values()), total, atol=1e-12, rtol=0)
    names = list(parts)
    assert names[:2] == ["latent level 1", "latent level 2 (top)"]
    assert (IMPORTANCE in names) == (k > 1)
    # The same noise as the model's own bits_per_dim (float32 there, float64 here).
    torch.manual_seed(11)
    torch.testing.assert_close(total.float(), model.bits_per_dim(x, k=k), atol=2e-6, rtol=0)


def test_parts_by_hand_for_a_two_level_glow():
    model = _glow()
    x = torch.randint(0, 17, (3, 1, 8, 8))
    torch.manual_seed(2)
    _, parts = bits_per_dim_parts(model, x)
    torch.manual_seed(2)  # the same uniform noise, drawn by hand
    y = (x.float() + torch.rand(x.shape)) / 17
    eps, logdet = model.transform(y)
    d = 64 * math.log(2)
    sizes = model.latent_sizes
    assert sizes == [32, 32]
    first, top = eps[:, :32].double(), eps[:, 32:].double()
    by_hand = {
        "latent level 1": 0.5 * (first.pow(2).sum(1) + 32 * math.log(2 * math.pi)) / d,
        "latent level 2 (top)": 0.5 * (top.pow(2).sum(1) + 32 * math.log(2 * math.pi)) / d,
        LOGDET: -logdet.double() / d,
        DEQUANT: torch.zeros(3, dtype=torch.float64),
        DISCRETE: torch.full((3,), math.log2(17), dtype=torch.float64),
    }
    for name, value in by_hand.items():
        torch.testing.assert_close(parts[name], value, atol=1e-6, rtol=0, msg=name)


def test_dequantization_part_is_log_q_over_d_ln2():
    num_bins, log_q = 17, -0.3
    model = ImageFlow(Flatten(SHAPE), SHAPE, num_bins, dequantizer=FixedNoise(0.5, log_q)).double()
    total, parts = bits_per_dim_parts(model, torch.randint(0, 17, (4, *SHAPE)))
    d = math.prod(SHAPE)
    assert list(parts) == ["latent", LOGDET, DEQUANT, DISCRETE]
    torch.testing.assert_close(parts[DEQUANT], torch.full_like(total, log_q / (d * math.log(2))))
    torch.testing.assert_close(parts[LOGDET], torch.zeros_like(total))


# ---------------------------------------------------------------------------------------------
# The importance-weighted bound


@pytest.mark.parametrize("dequant", ["squared_uniform", "variational"])
def test_importance_weighting_is_jensen_on_the_same_noise(dequant):
    """With the same noise, logmeanexp of 16 weights >= their mean: the k=16 bound is never
    looser than the mean of the 16 single-sample bounds, and the part that says so is <= 0."""
    if dequant == "variational":
        model = _glow(*TINY_VARIATIONAL)
    else:
        model = _glow()
        model.dequantizer = SquaredUniform()
    x = torch.randint(0, 17, (8, 1, 8, 8))
    torch.manual_seed(4)
    total, parts = bits_per_dim_parts(model, x, k=16)
    torch.manual_seed(4)  # the same 16 draws: one pass of 16 copies, as bits_per_dim makes them
    with torch.no_grad():
        w = model.log_weights(x.repeat(16, 1, 1, 1)).view(16, 8).double()
    log_mean_exp = torch.logsumexp(w, 0) - math.log(16)
    assert (log_mean_exp >= w.mean(0) - 1e-9).all()
    single_mean = (-w / (64 * math.log(2))).mean(0)
    torch.testing.assert_close(total, -log_mean_exp / (64 * math.log(2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(parts[IMPORTANCE], total - single_mean, atol=1e-5, rtol=0)
    assert (parts[IMPORTANCE] <= 1e-9).all()
    assert parts[IMPORTANCE].mean() < -1e-4  # weights that vary with u: a real gain
    assert parts[DEQUANT].abs().min() > 0  # log q enters


def test_uniform_density_is_unbiased_in_k_on_different_noise():
    """A model whose density is constant on every bin: all weights equal, so any k on any noise
    gives exactly log2(num_bins); a bound that forgot `- log k` would be off by log2(16) / D."""
    model = ImageFlow(Sequential([NormalQuantile(), Flatten(SHAPE)]), SHAPE, 17).double()
    x = torch.randint(0, 17, (5, *SHAPE))
    torch.manual_seed(0)
    k1, _ = bits_per_dim_parts(model, x, k=1)
    torch.manual_seed(1)
    k16, parts = bits_per_dim_parts(model, x, k=16)
    torch.testing.assert_close(k1, torch.full_like(k1, math.log2(17)), atol=1e-9, rtol=0)
    torch.testing.assert_close(k16, k1, atol=1e-9, rtol=0)
    torch.testing.assert_close(parts[IMPORTANCE], torch.zeros_like(k1), atol=1e-9, rtol=0)


def test_uniform_dequantization_k16_and_k1_agree_within_standard_errors(ckpt):
    """On the tiny trained Glow (uniform dequantization), whole test split, independent seeds:
    k=16 and k=1 agree within 3 of their standard errors (what nfcv-eval reports), and k=16 is
    not above k=1 by more than noise in the paired comparison.

    They are not equal in expectation exactly: E[bound_k] decreases with k unless the density is
    constant on every bin (the test above). Here the gain is about 0.0015 bits/dim, about a third
    of one standard error over images, but several paired standard errors.
    """
    from hydra.utils import instantiate

    model = nfcv.load(ckpt)
    loader = instantiate(model.config.data).eval_loader("test")
    torch.manual_seed(0)
    k1 = evaluate_split(model, loader, k=1, progress=False)
    torch.manual_seed(1)
    k16 = evaluate_split(model, loader, k=16, progress=False)
    assert abs(k16.mean() - k1.mean()) < 3 * math.hypot(k1.stderr(), k16.stderr())
    diff = k16.bpd - k1.bpd
    paired_se = (diff.std() / math.sqrt(diff.numel())).item()
    assert diff.mean().item() < 3 * paired_se


def test_k_1024_runs_in_passes_of_at_most_1024_images(monkeypatch):
    """Memory is bounded by MAX_IMAGES_PER_PASS images per forward pass, whatever k is."""
    model = _glow()
    seen = []
    transform = model.transform

    def counting(y, labels=None):
        seen.append(y.shape[0])
        return transform(y, labels)

    monkeypatch.setattr(model, "transform", counting)
    x = torch.randint(0, 17, (3, 1, 8, 8))
    total, _ = bits_per_dim_parts(model, x, k=1024)
    assert max(seen) <= 1024 and sum(seen) == 3 * 1024
    assert torch.isfinite(total).all()


# ---------------------------------------------------------------------------------------------
# nfcv-eval in process: CSV, several checkpoints, other data, EMA, errors


def test_per_image_csv_has_one_row_per_image_and_its_mean_is_the_bpd(ckpt, tmp_path):
    from nfcv.cli.eval import evaluate

    out = tmp_path / "e.json"
    result = evaluate(_eval_cfg(f"ckpt={ckpt}", "per_image=true", f"out={out}"))
    assert json.loads(out.read_text())["bpd"] == result["bpd"]
    with open(tmp_path / "e.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == result["num_images"] == 297
    assert [int(r["index"]) for r in rows] == list(range(297))
    from hydra.utils import instantiate

    test_split = instantiate(nfcv.load(ckpt).config.data).split("test")
    assert [int(r["label"]) for r in rows] == test_split.labels.tolist()  # in split order
    mean = math.fsum(float(r["bpd"]) for r in rows) / len(rows)
    assert mean == pytest.approx(result["bpd"], abs=1e-12)
    # The breakdown is stored and sums to the total.
    parts = result["breakdown"]
    assert math.fsum(p["bpd"] for p in parts) == pytest.approx(result["bpd"], abs=1e-9)
    assert [p.get("dims") for p in parts[:2]] == [32, 32]


def test_eval_is_deterministic_given_the_seed(ckpt, tmp_path):
    from nfcv.cli.eval import evaluate

    a = evaluate(_eval_cfg(f"ckpt={ckpt}", "seed=5", f"out={tmp_path / 'a.json'}"))
    b = evaluate(_eval_cfg(f"ckpt={ckpt}", "seed=5", f"out={tmp_path / 'b.json'}"))
    c = evaluate(_eval_cfg(f"ckpt={ckpt}", "seed=6", f"out={tmp_path / 'c.json'}"))
    assert a["bpd"] == b["bpd"] and a["breakdown"] == b["breakdown"]
    assert c["bpd"] != a["bpd"]


def test_other_data_must_have_the_models_shape(ckpt):
    from nfcv.cli.eval import evaluate

    with pytest.raises(ConfigError, match=r"data=mnist has images of shape \(1, 28, 28\)"):
        evaluate(_eval_cfg(f"ckpt={ckpt}", "data=mnist"))


def test_run_folders_resolve_to_their_best_checkpoint(tiny_run, tmp_path):
    run_dir = Path(tiny_run["run_dir"])
    assert run_checkpoint(run_dir) == Path(tiny_run["best_ckpt"])
    only_last = tmp_path / "sweep" / "1" / "checkpoints"
    only_last.mkdir(parents=True)
    (only_last / "last.ckpt").write_bytes(b"")
    (tmp_path / "sweep" / "0" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        expand_checkpoints(tmp_path / "sweep")
    (tmp_path / "sweep" / "0" / "checkpoints" / "best-step7.ckpt").write_bytes(b"")
    (tmp_path / "sweep" / "0" / "checkpoints" / "best-step12.ckpt").write_bytes(b"")
    assert expand_checkpoints(tmp_path / "sweep") == [
        tmp_path / "sweep" / "0" / "checkpoints" / "best-step12.ckpt",
        only_last / "last.ckpt",
    ]
    with pytest.raises(CheckpointError, match="folder without checkpoints"):
        expand_checkpoints(tmp_path / "sweep" / "0" / "checkpoints")
    hydra_dir = tmp_path / "sweep" / "0" / ".hydra"
    hydra_dir.mkdir()
    (hydra_dir / "overrides.yaml").write_text("- model.hidden=8\n- seed=1\n")
    assert run_label(tmp_path / "sweep" / "0") == "model.hidden=8 seed=1"
    assert run_label(tmp_path / "sweep" / "1") == "1"


# ---------------------------------------------------------------------------------------------
# Subprocesses, end to end


def test_several_checkpoints_give_one_comparison(tiny_run, tmp_path):
    best, run_dir = tiny_run["best_ckpt"], tiny_run["run_dir"]
    out = tmp_path / "cmp.json"
    proc = run(
        "nfcv-eval",
        f"ckpt=[{tiny_run['last_ckpt']},{run_dir}]",
        "per_image=true",
        f"out={out}",
        cwd=tmp_path,
    )
    summary = json.loads(out.read_text())
    rows = summary["comparison"]
    assert [r["checkpoint"] for r in rows] == [tiny_run["last_ckpt"], best]
    assert "diff vs #0" in proc.stdout and str(out) in proc.stdout
    for record in summary["results"]:  # each checkpoint's own JSON and CSV beside it
        path = Path(record["checkpoint"])
        own = json.loads(path.with_name(f"{path.stem}.eval-test.json").read_text())
        assert own["bpd"] == record["bpd"]
        assert Path(record["per_image_csv"]).is_file()
    assert "latent level 1" in proc.stdout and "log-determinant" in proc.stdout
    # Same images, same noise: the paired difference has its own standard error.
    assert "diff_vs_first" not in rows[0] and math.isfinite(rows[1]["diff_stderr"])
    assert rows[1]["diff_vs_first"] == pytest.approx(rows[1]["bpd"] - rows[0]["bpd"], abs=1e-12)


def test_ema_true_on_a_checkpoint_without_ema_is_a_clear_error(ckpt, tmp_path):
    proc = run("nfcv-eval", f"ckpt={ckpt}", "ema=true", cwd=tmp_path, check=False)
    _fails(proc, "no EMA weights", "ema=false")


@pytest.fixture(scope="module")
def fashion_ckpt(tmp_path_factory):
    """A tiny Glow trained on fake Fashion-MNIST files, and a folder of fake MNIST files."""
    from conftest import _tiny_overrides
    from test_data import write_mnist_like

    from nfcv.training.run import train

    root = tmp_path_factory.mktemp("ood")
    write_mnist_like(root / "fashion" / "FashionMNIST" / "raw", n_train=40, n_test=6)
    write_mnist_like(root / "mnist" / "MNIST" / "raw", n_train=12, n_test=7)
    overrides = _tiny_overrides(
        **{
            "data.root": str(root / "fashion"),
            "data.val_size": "8",
            "sample.reconstructions": "2",
            "trainer.log_every_n_steps": "1",  # 2 batches an epoch: below 10, Lightning warns
        }
    )
    summary = train(nfcv.compose(["data=fashion_mnist", *overrides]), run_dir=root / "run")
    return root, Path(summary["best_ckpt"])


def test_score_another_dataset_per_image(fashion_ckpt):
    root, ckpt = fashion_ckpt
    proc = run(
        "nfcv-eval",
        f"ckpt={ckpt}",
        "data=mnist",
        f"data.root={root / 'mnist'}",
        "per_image=true",
        cwd=root,
    )
    result = json.loads(ckpt.with_name(f"{ckpt.stem}.eval-mnist-test.json").read_text())
    assert result["data"]["name"] == "mnist" and result["trained_on"] == "fashion_mnist"
    assert result["num_images"] == 7
    with open(result["per_image_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert math.fsum(float(r["bpd"]) for r in rows) / 7 == pytest.approx(result["bpd"], abs=1e-12)
    assert "mnist test (7 images" in proc.stdout
