"""Bad input ends in one line that names the key, the value and what is allowed (exit status 2
from the commands), before anything is created: no run folder, no Trainer, no evaluation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

import nfcv
from nfcv.errors import CheckpointError, ConfigError, DataError, OutputError
from nfcv.training.run import train

CONFIGS = Path(nfcv.__file__).resolve().parent.parent / "configs"


def _one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < 400, text
    return text


def _fails_before_the_run(overrides: list[str], run_dir: Path) -> str:
    with pytest.raises(ConfigError) as info:
        train(nfcv.compose(overrides), run_dir=run_dir)
    assert not run_dir.exists(), sorted(run_dir.rglob("*"))
    return _one_line(info.value)


# ---------------------------------------------------------------------------- config values

# (override, the key the message names): each a value the config composes with today.
BAD_VALUES = [
    ("data.batch_size", "0"),
    ("data.batch_size", "-4"),
    ("data.eval_batch_size", "0"),
    ("data.num_workers", "-1"),
    ("optim.optimizer.lr", "-1"),
    ("optim.warmup_steps", "-1"),
    ("trainer.val_check_interval", "0"),
    ("trainer.val_check_interval", "1.5"),
    ("trainer.max_steps", "0"),
    ("trainer.gradient_clip_val", "-1"),
    ("callbacks.guard.max_bad_steps", "0"),
    ("seed", "abc"),
    ("seed", "-1"),
    ("data.image_shape", "[1,0,8]"),
    ("data.image_shape", "[1,8]"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_a_bad_value_fails_before_the_run_folder(tiny, tmp_path, key, value):
    message = _fails_before_the_run(tiny(**{key: value}), tmp_path / "run")
    assert f"{key}={value}" in message


def _datasets_with_num_bits() -> list[str]:
    return sorted(
        p.stem for p in (CONFIGS / "data").glob("*.yaml") if "num_bits" in p.read_text()
    )


@pytest.mark.parametrize("data", _datasets_with_num_bits())
def test_num_bits_outside_1_to_8_for_every_dataset(tiny, tmp_path, data):
    for bits in ("0", "9"):
        message = _fails_before_the_run(
            [f"data={data}", *tiny(**{"data.num_bits": bits})], tmp_path / "run"
        )
        assert f"data.num_bits={bits}" in message and "1..8" in message


def test_trainer_gpu_without_a_gpu_names_the_fix(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    overrides = [o for o in tiny() if not o.startswith("trainer.accelerator")]
    message = _fails_before_the_run([*overrides, "trainer=gpu"], tmp_path / "run")
    assert "trainer.accelerator=gpu" in message
    assert "trainer=cpu" in message and "trainer=default" in message


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_without_the_cluster_extra_names_the_install(monkeypatch, launcher):
    # Simulate the extra's absence: an entry of None in sys.modules makes its import fail.
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher", None)
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ConfigError) as info:
        nfcv.compose([f"hydra/launcher={launcher}"])
    message = _one_line(info.value)
    assert f"hydra/launcher={launcher}" in message and "pip install 'nfcv[cluster]'" in message

    from nfcv.cli.train import check_arguments

    with pytest.raises(ConfigError, match=r"pip install 'nfcv\[cluster\]'"):
        check_arguments(["-m", f"hydra/launcher={launcher}", "model=glow,realnvp"])
    check_arguments(["-m", "model=glow,realnvp"])  # no launcher asked for: nothing to check


def test_resume_with_another_model_size_names_the_keys(tiny, tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_run["last_ckpt"], run_dir / "checkpoints" / "last.ckpt")
    before = _contents(run_dir)
    with pytest.raises(ConfigError) as info:
        train(nfcv.compose(tiny(**{"model.hidden": "16", "resume": "auto"})), run_dir=run_dir)
    assert "model.hidden=8 there, 16 now" in _one_line(info.value)
    assert _contents(run_dir) == before  # no tb/, no status.json


def _contents(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name != ".lock")  # the run folder's lock


def test_malformed_safetensors_config_names_the_file(tmp_path):
    from safetensors.torch import save_file

    from nfcv.checkpoint import FORMAT

    path = tmp_path / "bad.safetensors"
    save_file(
        {"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, "nfcv_config": "[1, 2]"}
    )
    with pytest.raises(CheckpointError) as info:
        nfcv.load(path)
    assert str(path) in _one_line(info.value)


# ----------------------------------------------------------------------- a run that failed


def test_a_run_that_fails_leaves_no_empty_run_folder(tiny, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    run_dir = tmp_path / "outputs" / "day" / "run"
    with pytest.raises(DataError):
        train(nfcv.compose(["data=mnist", f"data.root={empty}", *tiny()]), run_dir=run_dir)
    assert not (tmp_path / "outputs").exists()


def test_a_failed_run_in_a_folder_made_for_it_is_marked_failed(tiny, tmp_path):
    """nfcv-train's folder exists before train() runs (Hydra makes it, with its log): kept, with
    status.json saying the run failed and why."""
    empty = tmp_path / "nodata"
    empty.mkdir()
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    with pytest.raises(DataError):
        train(nfcv.compose(["data=mnist", f"data.root={empty}", *tiny()]), run_dir=run_dir)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "DataError" in status["error"]


class _Crash(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("injected failure")


def test_a_run_that_fails_after_a_checkpoint_is_marked_failed(tiny, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(nfcv.compose(tiny()), run_dir=run_dir, callbacks=[_Crash()])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "injected failure" in status["error"]


# ----------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def model():
    from conftest import _tiny_overrides

    return nfcv.build_model(nfcv.compose(_tiny_overrides())).eval()


def _images(n: int = 2) -> torch.Tensor:
    return torch.randint(0, 17, (n, 1, 8, 8)).float()


def test_bits_per_dim_refuses_an_empty_batch(model):
    with pytest.raises(ValueError, match="empty"):
        model.bits_per_dim(_images(0))


def test_bits_per_dim_refuses_complex_images(model):
    with pytest.raises(ValueError, match="complex"):
        model.bits_per_dim(_images().to(torch.complex64))


@pytest.mark.parametrize("k", [2.5, 2.0, True, 0])
def test_bits_per_dim_refuses_a_k_that_is_not_a_whole_number(model, k):
    with pytest.raises(ValueError, match="k must be an integer"):
        model.bits_per_dim(_images(), k=k)


def test_labels_on_an_unconditional_model_are_refused(model):
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="not class-conditional"):
        model.log_prob(_images() / 16, labels=labels)
    with pytest.raises(ValueError, match="not class-conditional"):
        model.bits_per_dim(_images(), labels=labels)


@pytest.mark.parametrize("value", [2.0, -0.5, math.nan])
def test_log_prob_refuses_values_outside_0_1(model, value):
    x = _images() / 16
    x[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob(x)


@pytest.mark.parametrize(
    ("n", "temperature"), [(0, 1.0), (-1, 1.0), (2.5, 1.0), (2, math.nan), (2, math.inf), (2, -1)]
)
def test_sample_refuses_bad_n_or_temperature(model, n, temperature):
    with pytest.raises(ValueError, match="n must be" if n != 2 else "temperature"):
        model.sample(n, temperature=temperature)


# ------------------------------------------------------------------------ command arguments


def _cli_cfg(name: str, **values) -> OmegaConf:
    return nfcv.compose([f"{k}={v}" for k, v in values.items()], config_name=name)


@pytest.mark.parametrize("temperature", ["nan", "inf", "1e6", "-1", "[0.5,nan]"])
def test_sample_refuses_a_temperature_outside_0_100(tmp_path, temperature):
    from nfcv.cli.sample import sample

    cfg = _cli_cfg("sample", ckpt=tmp_path / "x.ckpt", temperature=temperature)
    with pytest.raises(ConfigError) as info:
        sample(cfg)
    assert "temperature" in _one_line(info.value) and "100" in str(info.value)


@pytest.mark.parametrize("value", [2.5, "2.5", True, "two"])
def test_int_arg_refuses_what_is_not_a_whole_number(value):
    from nfcv.cli.common import int_arg

    with pytest.raises(ConfigError, match="k must be an integer"):
        int_arg(OmegaConf.create({"k": value}), "k")
    assert int_arg(OmegaConf.create({"k": 3}), "k") == 3


def test_eval_k_2_5_is_refused_before_evaluating(tiny_run, tmp_path, monkeypatch):
    import nfcv.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "evaluate_split", _no_evaluation)
    cfg = _cli_cfg("eval", ckpt=tiny_run["last_ckpt"], k=2.5, out=tmp_path / "e.json")
    with pytest.raises(ConfigError, match="k must be an integer"):
        cli_eval.evaluate(cfg)


def _no_evaluation(*args, **kwargs):
    raise AssertionError("evaluated before checking out=")


def test_eval_out_that_cannot_be_written_fails_before_evaluating(tiny_run, tmp_path, monkeypatch):
    import nfcv.cli.eval as cli_eval

    monkeypatch.setattr(cli_eval, "evaluate_split", _no_evaluation)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(tmp_path, "is a folder"), (a_file / "sub" / "e.json", "is a file, not a folder")]
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        cases.append((locked / "e.json", "no permission"))
    for out, needle in cases:
        cfg = _cli_cfg("eval", ckpt=tiny_run["last_ckpt"], out=out, progress="false")
        with pytest.raises(OutputError) as info:
            cli_eval.evaluate(cfg)
        assert str(out) in _one_line(info.value) and needle in str(info.value)


def test_sample_reconstruct_too_many_images_is_one_short_line(tiny_run, tmp_path):
    from nfcv.cli.sample import sample

    cfg = _cli_cfg(
        "sample",
        ckpt=tiny_run["last_ckpt"],
        mode="reconstruct",
        n=100000,
        out=tmp_path / "r.png",
    )
    with pytest.raises(ConfigError) as info:
        sample(cfg)
    message = _one_line(info.value)
    assert "n=100000" in message and "297" in message


# ------------------------------------------------------------------- through the real command


def _command(module: str, *args: str, cwd: Path, env: dict | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _exit_2_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nfcv: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_command_bad_batch_size_exit_2_and_no_folder(tmp_path):
    proc = _command(
        "nfcv.cli.train", "data.batch_size=0", "hydra.run.dir=outputs/run", cwd=tmp_path
    )
    _exit_2_one_line(proc, "data.batch_size=0")
    assert not (tmp_path / "outputs").exists()


def test_command_trainer_gpu_without_a_gpu(tmp_path):
    proc = _command(
        "nfcv.cli.train",
        "trainer=gpu",
        "hydra.run.dir=outputs/run",
        cwd=tmp_path,
        env={"CUDA_VISIBLE_DEVICES": ""},
    )
    _exit_2_one_line(proc, "trainer=cpu", "trainer=default")
    assert not (tmp_path / "outputs").exists()


def test_command_launcher_without_the_cluster_extra(tmp_path):
    code = (
        "import sys; sys.modules['hydra_plugins.hydra_submitit_launcher'] = None; "
        "sys.modules['submitit'] = None; sys.argv[0] = 'nfcv-train'; "
        "from nfcv.cli.train import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "-m", "hydra/launcher=local", "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    _exit_2_one_line(proc, "pip install 'nfcv[cluster]'")
    assert not (tmp_path / "sweep").exists()


def test_command_sample_temperature_nan(tmp_path):
    proc = _command(
        "nfcv.cli.sample", f"ckpt={tmp_path / 'x.ckpt'}", "temperature=nan", cwd=tmp_path
    )
    _exit_2_one_line(proc, "temperature")
