"""Helpers shared by nfcv-sample and nfcv-eval."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from nfcv.api import resolve
from nfcv.errors import ConfigError
from nfcv.model import ImageFlow
from nfcv.registry import build, check_config
from nfcv.runs import expand_checkpoints


def checkpoint_arg(cfg: DictConfig) -> Path:
    if OmegaConf.is_missing(cfg, "ckpt") or cfg.ckpt in (None, ""):
        raise ConfigError(
            "no checkpoint given: pass ckpt=PATH, e.g. "
            "ckpt=outputs/2026-01-01/12-00-00/checkpoints/last.ckpt"
        )
    return Path(str(cfg.ckpt)).expanduser()


def device_arg(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device={name!r}: use auto, cpu or cuda[:N]") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} asked for, but CUDA is not available: use device=cpu")
    return device


def int_arg(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    """An integer option, with a clear error for text or values below `minimum`."""
    try:
        value = int(cfg[key])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key} must be an integer, got {cfg[key]!r}") from err
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return value


def checkpoints_arg(cfg: DictConfig) -> list[Path]:
    """``ckpt=``: a checkpoint, a run folder (its best checkpoint, else last.ckpt), a sweep folder
    (each run's) or a list of any of these -> checkpoint paths, in order."""
    checkpoint_arg(cfg)  # the missing-argument error
    values = list(cfg.ckpt) if isinstance(cfg.ckpt, ListConfig) else [cfg.ckpt]
    if not values:
        raise ConfigError("ckpt=[] names no checkpoint")
    return [path for value in values for path in expand_checkpoints(str(value))]


def ema_arg(cfg: DictConfig) -> bool | None:
    """``ema=``: null (the EMA weights when the checkpoint has them), true or false."""
    value = cfg.get("ema")
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(f"ema must be true, false or null (use it when present), got {value!r}")


def choice_arg(cfg: DictConfig, key: str, choices: Sequence[str]) -> str:
    value = str(cfg[key])
    if value not in choices:
        raise ConfigError(f"unknown {key}={value!r}: use one of {', '.join(choices)}")
    return value


def data_module(cfg: DictConfig, model: ImageFlow, batch_size: int | None = None):
    """The data module to read real images from: the checkpoint's own data, or ``data=NAME``
    (another dataset of the same image shape and number of levels, e.g. for out-of-distribution
    scores), with ``root=``/``download=`` applied. Not set up yet (that reads the files)."""
    other = cfg.get("data")
    if other is not None:
        data_cfg = OmegaConf.create(resolve(other))
        source = f"data={data_cfg.get('name', '?')}"
    else:
        stored = OmegaConf.to_container(model.config.data)  # unresolved: "${" stays visible
        source = f"the checkpoint's data ({stored.get('name')})"
        check_config(stored, source, where="data")  # also for models not from nfcv.load
        data_cfg = OmegaConf.create(stored)
    for key in ("root", "download"):
        if cfg.get(key) is not None:
            if key not in data_cfg:
                raise ConfigError(f"{key}= does not apply: {source} has no {key} option")
            data_cfg[key] = cfg[key]
    shape = tuple(int(s) for s in data_cfg.get("image_shape", ()))
    bins = int(data_cfg.get("num_bins", -1))
    if shape != model.image_shape or bins != model.num_bins:
        raise ConfigError(
            f"{source} has images of shape {shape} with {bins} levels per sub-pixel, but the "
            f"model takes shape {model.image_shape} with {model.num_bins} levels: score a dataset "
            "of the shape and bit depth the model was trained on (e.g. data=mnist for a "
            "fashion_mnist checkpoint)"
        )
    if batch_size is not None:
        data_cfg.eval_batch_size = batch_size
    return build(data_cfg, source=source, where="data")
