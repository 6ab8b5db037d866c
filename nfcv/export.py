"""Portable weights: a checkpoint's model as safetensors, with its resolved config inside.

``nfcv-export ckpt=RUN/checkpoints/last.ckpt out=model.safetensors`` writes the model's weights
and buffers (the EMA weights when the checkpoint has them, unless ``ema=false``) as a safetensors
file, a format of raw tensors and a JSON header that no reader executes; the header's metadata
holds the resolved train config (``nfcv_config``, JSON), the data record and which weights these
are. ``nfcv.load("model.safetensors")`` rebuilds the model from it alone, like a checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from nfcv import __version__
from nfcv.errors import CheckpointError

FORMAT = "nfcv-safetensors-1"


def export_safetensors(
    ckpt: str | os.PathLike, out: str | os.PathLike | None = None, ema: bool | None = None
) -> Path:
    """Write the model of checkpoint `ckpt` to `out` (default: beside it, ``.safetensors``).

    `ema` as in `nfcv.load`: None takes the EMA weights when present. Returns the path written.
    """
    from safetensors.torch import save_file

    from nfcv.api import load, read_checkpoint

    ckpt = Path(ckpt)
    model = load(ckpt, ema=ema)
    data_info = (read_checkpoint(ckpt).get("hyper_parameters") or {}).get("data_info") or {}
    out = Path(out) if out is not None else ckpt.with_suffix(".safetensors")
    # safetensors refuses tensors that share memory: every entry gets its own copy.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    from omegaconf import OmegaConf

    metadata = {
        "format": FORMAT,
        "nfcv_version": __version__,
        "nfcv_config": json.dumps(OmegaConf.to_container(model.config, resolve=True)),
        "data_info": json.dumps(data_info, default=str),
        "weights": "ema" if model.uses_ema else "trained",
        "source": ckpt.name,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)  # never a half-written file under the final name
    return out


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
    return tensors, info
