"""The layer catalogue: every flow layer by its config name (``configs/layer/<name>.yaml``)."""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nfcv.flows.base import Bijector
from nfcv.registry import build

LAYER_GROUP = "layer"


def _folder():
    return importlib.resources.files("nfcv.configs").joinpath(LAYER_GROUP)


def layer_names() -> list[str]:
    """Names accepted by `build_layer` (and by ``/layer@...`` entries of model configs)."""
    return sorted(p.name[: -len(".yaml")] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def layer_config(name: str) -> DictConfig:
    names = layer_names()
    if name not in names:
        raise ValueError(f"unknown layer {name!r}; the catalogue has: {', '.join(names)}")
    return OmegaConf.create(_folder().joinpath(f"{name}.yaml").read_text())


def build_layer(name: str, shape: Sequence[int], **overrides: Any) -> Bijector:
    """Build catalogue layer `name` for inputs of per-sample shape (C, H, W), or (N, D) for the
    token layers of the transformer flows (N tokens of D values, what ``patchify`` outputs).

    Keyword arguments override the layer's config, e.g. ``build_layer("spline_coupling",
    (4, 8, 8), num_bins=16)``. The shape is checked against the layer before it is returned.
    A config with ``spatial: null`` (``full_linear``, whose parameters depend on H and W, not
    only on C) is sized to the input: `spatial` becomes (H, W) of `shape`.
    """
    cfg = OmegaConf.merge(layer_config(name), overrides)
    if "spatial" in cfg and cfg.spatial is None:
        cfg.spatial = [int(s) for s in shape[1:]]
    made = build(cfg, source=f"layer {name!r}")
    # A partial config is completed with the channel count C, or with (N, D) for tokens.
    sizes = [int(s) for s in shape] if len(shape) == 2 else [int(shape[0])]
    layer = made if isinstance(made, Bijector) else made(*sizes)
    layer.output_shape(tuple(int(s) for s in shape))
    return layer
