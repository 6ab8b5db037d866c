"""nfcv: train normalizing flows on images from Hydra configs."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# Used by data configs: num_bins: ${pow2:${.num_bits}}.
OmegaConf.register_new_resolver("pow2", lambda bits: 2 ** int(bits), replace=True)

from nfcv.schema import register as _register_schemas  # noqa: E402

_register_schemas()

from nfcv.catalogue import build_layer, layer_names  # noqa: E402
from nfcv.checkpoint import load  # noqa: E402
from nfcv.config import build_model, compose  # noqa: E402
from nfcv.model import ImageFlow  # noqa: E402
from nfcv.registry import register  # noqa: E402

__all__ = [
    "ImageFlow",
    "__version__",
    "build_layer",
    "build_model",
    "compose",
    "layer_names",
    "load",
    "register",
]
