"""Configs: compose the packaged Hydra tree, resolve it to plain data, build a model from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nfcv.errors import ConfigError
from nfcv.flows.base import Bijector
from nfcv.flows.conv1x1 import name_layers
from nfcv.model import ImageFlow
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


def build_model(cfg: DictConfig | Mapping[str, Any]) -> ImageFlow:
    """An untrained `ImageFlow` from a train config (its ``model`` and ``dequant`` groups)."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(dict(cfg))
    model_cfg = cfg.model
    name = model_cfg.get("name", "model")
    try:
        flow = instantiate(model_cfg.flow)
        preprocess = instantiate(model_cfg.preprocess) if model_cfg.get("preprocess") else None
        dequantizer = instantiate(cfg.dequant) if cfg.get("dequant") else None
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
        model.config = cfg
        return model
    except ConfigError:
        raise
    except (InstantiationException, ValueError, OmegaConfBaseException) as err:
        raise ConfigError(f"cannot build model '{name}': {_root_message(err)}") from err
