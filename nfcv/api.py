"""The public entry points: `compose`, `build_model`, `load`."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nfcv.errors import CheckpointError, ConfigError
from nfcv.flows.base import Bijector
from nfcv.flows.conv1x1 import name_layers
from nfcv.model import ImageFlow
from nfcv.registry import build, check_config, resolved
from nfcv.schema import check_keys

CONFIG_MODULE = "nfcv.configs"


def compose(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose a config from the packaged tree, as the command-line tools do.

    ``nfcv.compose(["model=glow", "data=digits", "model.steps=4"])``.
    """
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra if global_hydra.is_initialized() else None
    global_hydra.clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
        check_keys(cfg)
        return cfg
    finally:
        if outer is not None:
            GlobalHydra.instance().initialize(outer)


def _root_message(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config, interpolations resolved, as plain containers (what checkpoints keep)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(
            f"the config does not resolve: {str(err).splitlines()[0]}. Check the spelling of the "
            "overridden values (e.g. model.coupling and model.permutation take the names listed "
            "under model.choices)"
        ) from err


def build_model(cfg: DictConfig | Mapping[str, Any], *, source: str = "the config") -> ImageFlow:
    """An untrained `ImageFlow` from a train config (its ``model`` and ``dequant`` groups).

    Only classes in `nfcv.registry` are built (`nfcv.registry.build`); `source` names the
    config in errors (the file, for a loaded checkpoint)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    model_cfg = cfg.model
    name = model_cfg.get("name", "model")
    try:
        flow = build(resolved(model_cfg.flow), source=source, where="model.flow")
        preprocess = model_cfg.get("preprocess")
        if preprocess:
            preprocess = build(resolved(preprocess), source=source, where="model.preprocess")
        dequantizer = cfg.get("dequant")
        if dequantizer:
            dequantizer = build(resolved(dequantizer), source=source, where="dequant")
        for key, obj in (("model.flow", flow), ("model.preprocess", preprocess)):
            if obj is not None and not isinstance(obj, Bijector):
                raise ConfigError(
                    f"{key} must build an nfcv Bijector, got {type(obj).__name__}: check its "
                    "_target_"
                )
        num_classes = None
        if model_cfg.get("conditional", False):
            num_classes = model_cfg.get("num_classes")
            if not num_classes:
                raise ConfigError(
                    "model.conditional=true needs model.num_classes: nfcv-train sets it from a "
                    "labelled dataset; with nfcv.build_model set it yourself"
                )
        model = ImageFlow(
            flow,
            image_shape=tuple(model_cfg.image_shape),
            num_bins=int(model_cfg.num_bins),
            dequantizer=dequantizer,
            preprocess=preprocess,
            num_classes=num_classes,
        )
        if model_cfg.get("checkpoint_grads", False):
            model.checkpoint_networks(True)
        name_layers(model)  # a singular 1x1 conv is reported by its path in the model
        return model
    except ConfigError:
        raise
    except (TypeError, ValueError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot build model '{name}': {_root_message(err)}") from err


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``: no pickled code runs)."""
    path = Path(path)
    if not path.is_file():
        hint = ""
        if path.is_dir():
            hint = (
                f"; it is a folder: pass a file in it, e.g. {path / 'checkpoints' / 'last.ckpt'}"
            )
        raise CheckpointError(f"checkpoint not found: {path}{hint}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
            "(not a zip archive)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain containers "
            f"(weights_only=True rejected it: {str(err).splitlines()[0]}). Only load checkpoints "
            "written by nfcv from sources you trust"
        ) from err
    except Exception as err:  # torch raises many types for damaged archives
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    if "cfg" not in hparams:
        raise CheckpointError(
            f"{path} is not an nfcv checkpoint: it has no resolved config (hyper_parameters.cfg)"
        )
    return ckpt


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    ema: bool | None = None,
) -> ImageFlow:
    """Rebuild a trained `ImageFlow` from a checkpoint alone, in eval mode.

    `ema`: None (default) loads the exponential moving average of the weights when the checkpoint
    has one (trained with ``ema.decay``) and the trained weights otherwise; True insists on the
    average (a `CheckpointError` without it); False loads the trained weights.

    `path` may also be a ``.safetensors`` file written by ``nfcv-export`` (weights and config,
    no pickle at all); it holds one set of weights, and `ema` must not ask for the other.

    The returned model has a ``config`` attribute holding the resolved train config and a
    ``uses_ema`` attribute saying which weights it holds.
    """
    if Path(path).suffix == ".safetensors":
        return _load_safetensors(Path(path), map_location, ema)
    ckpt = read_checkpoint(path)
    check_config(ckpt["hyper_parameters"]["cfg"], str(path))
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["cfg"])
    has_ema = ckpt.get("ema_state_dict") is not None
    if ema is None:
        ema = has_ema
    elif ema and not has_ema:
        raise CheckpointError(
            f"{path} has no EMA weights (it was trained without ema.decay, or saved before the "
            "first step): load it with ema=false"
        )
    model = build_model(cfg, source=str(path))
    if ema:
        state = ckpt["ema_state_dict"]
    else:
        prefix = "model."
        state = {
            k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)
        }
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        which = "EMA weights" if ema else "weights"
        raise CheckpointError(
            f"the {which} in {path} do not match the model its config describes: {err}"
        ) from err
    model.config = cfg
    model.uses_ema = bool(ema)
    model.data_info = (ckpt.get("hyper_parameters") or {}).get("data_info") or {}
    name_layers(model, singular="raise")  # evaluation: never invert a singular 1x1 conv
    return model.to(map_location).eval()


def _load_safetensors(path: Path, map_location: str | torch.device, ema: bool | None) -> ImageFlow:
    from nfcv.export import read_safetensors

    tensors, info = read_safetensors(path)
    check_config(info["config"], str(path))
    is_ema = info["weights"] == "ema"
    if ema is not None and bool(ema) != is_ema:
        raise CheckpointError(
            f"{path} holds the {'EMA' if is_ema else 'trained'} weights only, and ema={ema} asks "
            "for the other set: export them with nfcv-export ema=..., or load with ema=null"
        )
    cfg = OmegaConf.create(info["config"])
    model = build_model(cfg, source=str(path))
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(
            f"the weights in {path} do not match the model its config describes: {err}"
        ) from err
    model.config = cfg
    model.uses_ema = is_ema
    model.data_info = info.get("data_info") or {}
    name_layers(model, singular="raise")
    return model.to(map_location).eval()
