"""The checkpoint format, and the one module that knows it.

A checkpoint is a Lightning checkpoint (a zip written by ``torch.save``) whose
``hyper_parameters`` hold the resolved train config as plain containers (`CONFIG`), the record of
the data it was trained on (`DATA_INFO`) and the nfcv version; the model's weights are the
`STATE_DICT` entries under `MODEL_PREFIX`; with ``ema.decay`` the averaged weights are
`EMA_STATE` (the model's own keys) beside `EMA_INFO`. It is read with
``torch.load(weights_only=True)``, so no pickled code runs, and its config is checked by
`nfcv.registry.check_config` before anything is built from it, and then only registered classes
are built.

Writes are atomic. Lightning's `TorchCheckpointIO` serialises a checkpoint in memory and then
writes it over the file in place: a process killed during that write leaves a truncated
``last.ckpt``. `AtomicCheckpointIO` writes to a temporary file in the same folder, fsyncs it and
renames it over the target with `os.replace`: a reader sees the old file or the new one, never a
part. Temporary files left by killed writers are removed by the next save.

A safetensors export (``nfcv-export``) holds one set of weights as raw tensors with the resolved
config and the data record as JSON in its metadata: a format no reader executes.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from nfcv import __version__
from nfcv.config import build_model
from nfcv.data.files import atomic_path, check_output
from nfcv.errors import CheckpointError
from nfcv.flows.conv1x1 import name_layers
from nfcv.model import ImageFlow
from nfcv.registry import check_config

# The keys of a checkpoint (top level of the Lightning checkpoint dict, and its hparams).
STATE_DICT = "state_dict"
MODEL_PREFIX = "model."  # FlowModule keeps the ImageFlow as `self.model`
HPARAMS = "hyper_parameters"
CONFIG = "cfg"
DATA_INFO = "data_info"
VERSION = "nfcv_version"
EMA_STATE = "ema_state_dict"
EMA_INFO = "ema"  # {"decay": float, "num_updates": int}


def hparams(cfg: Mapping[str, Any], data_info: Mapping[str, Any] | None) -> dict[str, Any]:
    """What `FlowModule` saves as its hyperparameters: the checkpoint's config and data record."""
    return {CONFIG: dict(cfg), DATA_INFO: dict(data_info or {}), VERSION: __version__}


# ---------------------------------------------------------------------------------------------
# Atomic writes


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` through a fsynced temporary file and `os.replace` (`atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic (see the module docstring); paths with a
    scheme (``s3://...``) go through Lightning's own writer."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


# ---------------------------------------------------------------------------------------------
# Reading and loading


@dataclass
class Loaded:
    """What `load_checkpoint` read: the model (eval mode) and the facts stored beside it."""

    model: ImageFlow
    config: DictConfig
    uses_ema: bool
    data_info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


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
    if not isinstance(ckpt, dict) or STATE_DICT not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    stored = ckpt.get(HPARAMS) or {}
    if CONFIG not in stored:
        raise CheckpointError(
            f"{path} is not an nfcv checkpoint: it has no resolved config (hyper_parameters.cfg)"
        )
    return ckpt


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    ema: bool | None = None,
) -> Loaded:
    """Rebuild a trained `ImageFlow` from a checkpoint (``.ckpt``) or an export
    (``.safetensors``) alone, in eval mode, with the config, data record and weights it holds.

    `ema`: None (default) takes the exponential moving average of the weights when the file has
    one (trained with ``ema.decay``) and the trained weights otherwise; True insists on the
    average (a `CheckpointError` without it); False takes the trained weights. An export holds
    one set of weights, and `ema` must not ask for the other.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        tensors, info = read_safetensors(path)
        raw_cfg, data_info = info["config"], info.get("data_info") or {}
        uses_ema = info["weights"] == "ema"
        if ema is not None and bool(ema) != uses_ema:
            raise CheckpointError(
                f"{path} holds the {'EMA' if uses_ema else 'trained'} weights only, and ema={ema} "
                "asks for the other set: export them with nfcv-export ema=..., or load with "
                "ema=null"
            )
        state, which = tensors, "weights"
    else:
        ckpt = read_checkpoint(path)
        raw_cfg = ckpt[HPARAMS][CONFIG]
        data_info = ckpt[HPARAMS].get(DATA_INFO) or {}
        has_ema = ckpt.get(EMA_STATE) is not None
        if ema and not has_ema:
            raise CheckpointError(
                f"{path} has no EMA weights (it was trained without ema.decay, or saved before "
                "the first step): load it with ema=false"
            )
        uses_ema = has_ema if ema is None else bool(ema)
        if uses_ema:
            state, which = ckpt[EMA_STATE], "EMA weights"
        else:
            state, which = model_state(ckpt), "weights"
    # The stored config is data from a file: checked before anything is built from it, and then
    # only registered classes are (nfcv.registry; "Security" in docs/design.md).
    if not isinstance(raw_cfg, Mapping):
        raise CheckpointError(
            f"{path} is not an nfcv checkpoint: its config is a {type(raw_cfg).__name__}, not a "
            "mapping of config groups"
        )
    check_config(raw_cfg, str(path))
    cfg = OmegaConf.create(raw_cfg)
    model = build_model(cfg, source=str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(
            f"the {which} in {path} do not match the model its config describes: {err}"
        ) from err
    name_layers(model, singular="raise")  # evaluation: never invert a singular 1x1 conv
    model = model.to(map_location).eval()
    return Loaded(model, cfg, uses_ema, dict(data_info), path)


def load(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    ema: bool | None = None,
) -> ImageFlow:
    """The trained `ImageFlow` of a checkpoint or export, in eval mode (`load_checkpoint`'s
    model; its ``config`` is the resolved train config it was built from)."""
    return load_checkpoint(path, map_location, ema).model


def model_state(ckpt: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The `ImageFlow`'s own state dict inside a checkpoint's `STATE_DICT`."""
    n = len(MODEL_PREFIX)
    return {k[n:]: v for k, v in ckpt[STATE_DICT].items() if k.startswith(MODEL_PREFIX)}


# ---------------------------------------------------------------------------------------------
# safetensors export

FORMAT = "nfcv-safetensors-1"


def export_safetensors(
    ckpt: str | os.PathLike, out: str | os.PathLike | None = None, ema: bool | None = None
) -> Path:
    """Write the model of checkpoint `ckpt` to `out` (default: beside it, ``.safetensors``).

    `ema` as in `nfcv.load`: None takes the EMA weights when present. Returns the path written.
    """
    from safetensors.torch import save_file

    ckpt = Path(ckpt)
    out = Path(out) if out is not None else ckpt.with_suffix(".safetensors")
    what = "a safetensors export"
    check_output(out, _is_export, what)  # before the work: a folder, or a file of the user's
    loaded = load_checkpoint(ckpt, ema=ema)
    model, data_info = loaded.model, loaded.data_info
    # safetensors refuses tensors that share memory: every entry gets its own copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "nfcv_version": __version__,
        "nfcv_config": json.dumps(OmegaConf.to_container(loaded.config, resolve=True)),
        "data_info": json.dumps(data_info, default=str),
        "weights": "ema" if loaded.uses_ema else "trained",
        "source": ckpt.name,
    }
    with atomic_path(out, _is_export, what) as tmp:  # never a half-written file under `out`
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def _is_export(path: Path) -> bool:
    """Whether `path` is a file `export_safetensors` wrote (one it may replace)."""
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a safetensors file at all
        return False


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the decoded metadata (``config``, ``data_info``, ``weights``) of a file
    written by `export_safetensors`; a `CheckpointError` for anything else."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"cannot read {path}: the file is truncated or not a safetensors file ({err})"
        ) from err
    if meta.get("format") != FORMAT or "nfcv_config" not in meta:
        raise CheckpointError(
            f"{path} is not an nfcv export: its metadata has no nfcv config (write one with "
            "nfcv-export ckpt=... out=...)"
        )
    try:
        info = {
            "config": json.loads(meta["nfcv_config"]),
            "data_info": json.loads(meta.get("data_info", "{}")),
            "weights": meta.get("weights", "trained"),
            "nfcv_version": meta.get("nfcv_version"),
        }
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its nfcv metadata is not valid JSON ({err})") from err
    for key, entry in (("config", "nfcv_config"), ("data_info", "data_info")):
        if not isinstance(info[key], dict):
            kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}
            raise CheckpointError(
                f"{path}: its nfcv metadata is malformed: {entry} must be a JSON object (the "
                f"resolved train config, the data record), got "
                f"{kind.get(type(info[key]), 'a number')}"
            )
    return tensors, info
