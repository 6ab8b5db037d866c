"""Helpers shared by nfcv-sample and nfcv-eval."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from nfcv.errors import ConfigError


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
