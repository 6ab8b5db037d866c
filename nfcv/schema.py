"""Structured-config schemas of the config groups: a mistyped key or a value of the wrong type
fails when Hydra composes the config, before any data is read, with Hydra's message.

Each YAML file of the ``data``, ``model``, ``dequant``, ``optim`` and ``trainer`` groups starts
from one of these dataclasses (stored in Hydra's ConfigStore under ``schema/<group>/<name>``)::

    defaults:
      - /schema/model@_here_: glow
      - _self_

so the file, experiments and command-line overrides are merged onto a typed node: an unknown key
(``model.hiden=64``) or a value that does not convert (``model.steps=four``) is an error naming
the key. Fields typed ``Any`` hold the nested ``_target_`` blocks that ``hydra.utils.instantiate``
builds; their classes check their own arguments.

The trainer's schema lists every argument of ``lightning.Trainer``, so any of them can be set
(``trainer.accumulate_grad_batches=8``, no ``+``) and nothing else.

`register()` runs when ``nfcv`` is imported, so before Hydra composes anything from the tree.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from nfcv.errors import ConfigError

# ----------------------------------------------------------------------------------------- data


@dataclass
class DataSchema:
    """Keys every data module takes (`nfcv.data`)."""

    _target_: str = MISSING
    name: str = MISSING
    image_shape: list[int] = MISSING  # [channels, height, width]
    num_bins: int = MISSING  # quantisation levels of a pixel (2 ** num_bits)
    val_size: int | None = MISSING  # null: the dataset's official validation split
    split_seed: int = 0
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    num_workers: int | str = MISSING  # DataLoader workers: an integer, or auto (from the CPUs)
    pin_memory: bool | None = None  # page-locked batches; null: exactly when training on CUDA
    shuffle_seed: Any = "${seed}"  # the training order: drawn from (shuffle_seed, epoch)


@dataclass
class DigitsSchema(DataSchema):
    test_size: int = 297


@dataclass
class FileDataSchema(DataSchema):
    """Datasets read from files under ``root``."""

    root: str = MISSING
    download: bool = False
    verify: bool = True  # torchvision's MD5s of the files, where it lists them
    num_bits: int = MISSING
    hflip: bool = MISSING
    checksum: bool = True


@dataclass
class SVHNSchema(FileDataSchema):
    extra: bool = False


@dataclass
class CelebASchema(FileDataSchema):
    crop: list[int] | None = MISSING  # top, left, height, width; null: centre crop
    resample: str = "bilinear"


@dataclass
class CelebAHQSchema(FileDataSchema):
    resample: str = "box"
    test_size: int = 3000


@dataclass
class FolderSchema(FileDataSchema):
    test_root: str | None = None
    test_size: int = 1000


# ---------------------------------------------------------------------------------------- model


@dataclass
class ModelSchema:
    """Keys every model preset has (`nfcv.build_model` reads them)."""

    name: str = MISSING
    image_shape: list[int] = MISSING
    num_bins: int = MISSING
    conditional: bool = False  # class-conditional prior on the top latent
    num_classes: int | None = None  # set by nfcv-train from the data when conditional
    preprocess: Any = MISSING  # a bijection applied first (`_target_` block) or null
    flow: Any = MISSING  # the flow (`_target_` block)


@dataclass
class GlowSchema(ModelSchema):
    checkpoint_grads: bool = False
    levels: int = 2
    steps: int = MISSING
    hidden: int = 48
    dropout: float = 0.2
    coupling: str = MISSING
    permutation: str = MISSING
    norm: str = "actnorm"
    coupling_net: Any = MISSING
    choices: Any = MISSING  # the catalogue layers `coupling`, `permutation` and `norm` pick from


@dataclass
class MAFSchema(GlowSchema):
    autoregressive: str = "maf"  # maf | iaf


@dataclass
class NICESchema(ModelSchema):
    couplings: int = 4
    hidden: int = 256
    layers: int = 4
    prior: str = "logistic"  # logistic | gaussian
    data_init: bool = True
    linear: str = "none"  # none | full_linear: a linear flow before every coupling
    choices: Any = MISSING  # the catalogue layers `linear` picks from


@dataclass
class RealNVPSchema(ModelSchema):
    checkpoint_grads: bool = False
    scales: int = 2
    hidden: int = 32
    blocks: int = 2
    alpha: float = 0.05


@dataclass
class FlowPPSchema(ModelSchema):
    checkpoint_grads: bool = False
    scales: list[list[int]] = field(default_factory=lambda: [[0, 4], [2, 3]])
    factor_out: bool = False
    hidden: int = 32
    blocks: int = 2
    components: int = 4
    heads: int = 4
    dropout: float = 0.0
    alpha: float = 0.05


@dataclass
class TarFlowSchema(ModelSchema):
    checkpoint_grads: bool = False
    patch_size: int = 2
    blocks: int = 4
    layers: int = 2
    width: int = 64
    head_dim: int = 32
    expansion: int = 4
    label_dropout: float = 0.1  # class-conditional: labels replaced by the null class (CFG)
    block: Any = MISSING  # the catalogue layer tarflow_block (`_target_` block, partial)


@dataclass
class ResFlowSchema(ModelSchema):
    blocks: list[int] = field(default_factory=lambda: [4, 4])  # residual blocks per scale
    hidden: int = 32
    lipschitz: float = 0.98
    factor_out: bool = False
    actnorm: bool = True
    fc_blocks: int = 2
    fc_hidden: int = 64
    alpha: float = 0.05
    block: Any = MISSING  # the residual block (catalogue layer `resflow`, partial)


@dataclass
class JetSchema(ModelSchema):
    checkpoint_grads: bool = False
    patch_size: int = 2
    couplings: int = 24
    block_depth: int = 1
    width: int = 32
    heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    scale_factor: float = 2.0
    kinds: list[str] = field(default_factory=lambda: ["channels", "channels", "spatial"])
    spatial_splits: list[str] = field(default_factory=lambda: ["checkerboard", "checkerboard-inv"])
    permutation_seed: int = 0
    coupling: Any = MISSING  # the jet_coupling catalogue layer (`_target_` block, partial)


# -------------------------------------------------------------------------------------- dequant


@dataclass
class UniformSchema:
    _target_: str = "nfcv.dequant.UniformDequantization"


@dataclass
class GaussianSchema:
    _target_: str = "nfcv.dequant.GaussianDequantization"
    noise_std: float = 0.05


@dataclass
class VariationalSchema:
    _target_: str = "nfcv.dequant.VariationalDequantization"
    image_shape: list[int] = MISSING
    num_steps: int = 4
    context_channels: int = 16
    context_blocks: int = 3
    dropout: float = 0.0
    coupling: Any = MISSING  # the coupling of each step (`_target_` block, partial)


# ---------------------------------------------------------------------------------------- optim


@dataclass
class OptimSchema:
    optimizer: Any = MISSING  # a partial torch.optim class (`_target_` block)
    warmup_steps: int = 100
    decay: str = "cosine"  # none | cosine
    total_steps: int = MISSING


# -------------------------------------------------------------------------------------- trainer


@dataclass
class TrainerSchema:
    """Every argument of ``lightning.Trainer`` (2.x) with its default, but the ones nfcv sets
    itself (logger, callbacks, plugins, default_root_dir). ``Any`` where Lightning takes several
    types (devices: 2, "auto" or [0, 1]; val_check_interval: an int counts batches, a float is a
    fraction of an epoch). tests/test_schema.py checks the fields against Trainer's signature."""

    _target_: str = "lightning.Trainer"
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    precision: Any = None
    fast_dev_run: Any = False
    max_epochs: int | None = None
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 1
    num_sanity_val_steps: int | None = None
    log_every_n_steps: int | None = None
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = None
    enable_model_summary: bool | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None  # norm | value
    deterministic: Any = None  # true | false | warn
    benchmark: bool | None = None
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None  # simple | advanced | pytorch
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0
    enable_autolog_hparams: bool = True
    model_registry: str | None = None


# Arguments of lightning.Trainer that nfcv passes itself: not in the schema.
TRAINER_OWN = ("logger", "callbacks", "plugins", "default_root_dir")


# ------------------------------------------------------------------------------------- register

SCHEMAS: dict[str, dict[str, type]] = {
    "data": {
        "base": DataSchema,
        "digits": DigitsSchema,
        "files": FileDataSchema,
        "svhn": SVHNSchema,
        "celeba": CelebASchema,
        "celeba_hq": CelebAHQSchema,
        "folder": FolderSchema,
    },
    "model": {
        "glow": GlowSchema,
        "maf": MAFSchema,
        "nice": NICESchema,
        "realnvp": RealNVPSchema,
        "flowpp": FlowPPSchema,
        "jet": JetSchema,
        "tarflow": TarFlowSchema,
        "resflow": ResFlowSchema,
    },
    "dequant": {
        "uniform": UniformSchema,
        "variational": VariationalSchema,
        "gaussian": GaussianSchema,
    },
    "optim": {"optim": OptimSchema},
    "trainer": {"trainer": TrainerSchema},
}


def register() -> None:
    """Store the schemas in Hydra's ConfigStore, under ``schema/<group>/<name>``."""
    store = ConfigStore.instance()
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)


def check_keys(cfg: DictConfig) -> None:
    """Raise `ConfigError` for a key of a typed group that its schema does not have.

    Hydra rejects ``model.hiden=64`` itself, but ``+model.hiden=64`` (the syntax for adding a
    key) adds it even to a typed node, and the key would then be silently ignored (model) or
    fail only when the object is built, after the data is read (data, trainer)."""
    for group in SCHEMAS:
        node = cfg.get(group) if isinstance(cfg, DictConfig) else None
        if not isinstance(node, DictConfig):
            continue
        node_type = OmegaConf.get_type(node)
        if node_type is None or not dataclasses.is_dataclass(node_type):
            continue
        known = {f.name for f in fields(node_type)}
        for key in node:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"; did you mean {group}.{close[0]}?" if close else ""
                raise ConfigError(
                    f"{group}.{key} is not a setting of {group} ({node_type.__name__} in "
                    f"nfcv/schema.py lists them){hint}"
                )
