"""What a config may build: an explicit registry of classes, and the builder that uses only it.

A checkpoint (``.ckpt``) or an export (``.safetensors``) holds the resolved train config, and
`nfcv.load` rebuilds the model from it. That config is data from a file, which anyone may have
written, so building it must not run anything but the constructors of nfcv's own classes. Hydra's
``instantiate`` cannot promise that: it resolves a ``_target_`` by importing modules and walking
their attributes, so ``nfcv.checkpoint.torch.load`` or ``nfcv.checkpoint.os.system`` are as good as
``nfcv.flows.GlowNet`` to it; and OmegaConf builds nodes from ``${oc.create:...}`` interpolations
when they are read, out of sight of any check of the stored dictionary.

Here a ``_target_`` is a key in a dictionary of class objects (`lookup`), filled from nfcv's own
classes under the exact names its configs and saved checkpoints use: every class exported by
`nfcv.flows` (``nfcv.flows.GlowNet``), the dequantizers (``nfcv.dequant.UniformDequantization``),
the data modules (``nfcv.data.DigitsDataModule``) and four optimizers (``torch.optim.Adam``,
``Adamax``, ``AdamW``, ``SGD``). No string from a config is ever imported or walked as an
attribute path. A class of your own is added with `register`, e.g. as a decorator::

    from nfcv.registry import register

    @register  # as "mypkg.layers.MyCoupling", its module and qualified name
    class MyCoupling(nfcv.flows.AffineCoupling): ...

`build` replaces ``hydra.utils.instantiate`` for model, layer, optimizer and evaluation-data
configs: plain containers only, ``_target_`` from the registry, ``_partial_`` the one other
special key, and every other key a parameter of the class (`parameters`). `check_config` is what
loading runs on a stored config before anything is built; see "Security" in docs/design.md.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import nfcv.dequant
import nfcv.flows
from nfcv.errors import CheckpointError, ConfigError

T = TypeVar("T", bound=type)

TARGET, PARTIAL = "_target_", "_partial_"

# The data modules of nfcv.data, by attribute name: looked up when first needed, because importing
# nfcv.data imports Lightning (seconds), which loading a model for sampling does not need.
# tests/test_security.py checks this list against the DataModule classes nfcv.data defines.
DATA_MODULES = (
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CelebADataModule",
    "CelebAHQDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "FolderDataModule",
    "ImageNetDataModule",
    "MNISTDataModule",
    "SVHNDataModule",
)
DEQUANTIZERS = ("UniformDequantization", "VariationalDequantization", "GaussianDequantization")
OPTIMIZERS = ("Adam", "Adamax", "AdamW", "SGD")

# The parts of a stored train config that record how the run was wired and that loading never
# builds: the trainer, the callbacks and the logger (``trainer._target_: lightning.Trainer``,
# ``callbacks.guard._target_: nfcv.training.guard.NumericalGuard``, a callback of the user's own
# added with ``+callbacks.NAME=...``). `check_config` accepts any ``_target_`` string (and
# Hydra's special keys) under them, still plain data without interpolations; `lookup` never
# sees them: only the model, dequantization, optimizer and data groups are built from a file.
RECORDED_ONLY = ("trainer", "callbacks", "logger")

_classes: dict[str, type] = {}
_deferred: dict[str, Callable[[], type]] = {}


class NotRegisteredError(ConfigError):
    """A ``_target_`` that is not a registered class."""


def _data_module(attr: str) -> Callable[[], type]:
    def load() -> type:
        import nfcv.data

        cls = getattr(nfcv.data, attr)
        if not (isinstance(cls, type) and issubclass(cls, nfcv.data.ImageDataModule)):
            raise TypeError(f"nfcv.data.{attr} is not a data module")  # a bug in DATA_MODULES
        return cls

    return load


def _register_builtins() -> None:
    for attr in nfcv.flows.__all__:
        obj = getattr(nfcv.flows, attr)
        if isinstance(obj, type):
            _classes[f"nfcv.flows.{attr}"] = obj
    for attr in DEQUANTIZERS:
        _classes[f"nfcv.dequant.{attr}"] = getattr(nfcv.dequant, attr)
    for attr in OPTIMIZERS:
        _classes[f"torch.optim.{attr}"] = getattr(torch.optim, attr)
    for attr in DATA_MODULES:
        _deferred[f"nfcv.data.{attr}"] = _data_module(attr)


_register_builtins()


def register(cls: T | None = None, name: str | None = None) -> T | Callable[[T], T]:
    """Allow configs (and so checkpoints) to build `cls` as ``_target_: <name>``.

    `name` defaults to ``<module>.<qualified name>`` of the class, the string Hydra configs use.
    Returns the class, so it works as a decorator: ``@register`` or ``@register(name="...")``.
    A name already registered for another class is an error (nothing is replaced silently).
    Register before loading a checkpoint whose config names the class, and before training
    with it: nfcv builds every model through this registry.
    """
    if cls is None:
        return lambda c: register(c, name)
    if not isinstance(cls, type):
        raise TypeError(f"register takes a class, got {cls!r}")
    name = f"{cls.__module__}.{cls.__qualname__}" if name is None else name
    if not isinstance(name, str) or not name or "${" in name or name.startswith("_"):
        raise ValueError(f"cannot register {cls.__qualname__} under the name {name!r}")
    current = _classes.get(name)
    if current is None and name in _deferred:
        current = lookup(name)
    if current is not None and current is not cls:
        raise ValueError(
            f"{name!r} is already registered for {current.__module__}.{current.__qualname__}: "
            "register the new class under another name"
        )
    _classes[name] = cls
    return cls


def is_registered(name: Any) -> bool:
    return isinstance(name, str) and (name in _classes or name in _deferred)


def names() -> list[str]:
    """Every registered ``_target_``, sorted."""
    return sorted({*_classes, *_deferred})


def lookup(name: Any) -> type:
    """The class registered as `name`; a `NotRegisteredError` for anything else (the name is
    a dictionary key: never imported, never resolved through attributes)."""
    if isinstance(name, str):
        cls = _classes.get(name)
        if cls is None and name in _deferred:
            cls = _classes[name] = _deferred.pop(name)()
        if cls is not None:
            return cls
    raise NotRegisteredError(
        f"{name!r} is not a registered class. A config (and so a checkpoint) may only build the "
        "classes in nfcv.registry: nfcv's layers, networks, priors, dequantizers and data "
        "modules and the optimizers torch.optim.Adam, Adamax, AdamW and SGD "
        "(nfcv.registry.names() lists them). For a class of your own, call "
        "nfcv.registry.register(YourClass) (or put @register above it) before building or loading"
    )


@functools.cache
def parameters(cls: type) -> frozenset[str]:
    """The keyword names a config may give `cls`: the named parameters of the ``__init__`` that
    runs and, where that ``__init__`` takes ``**kwargs``, of the next ``__init__`` up the MRO
    (where nfcv's data modules pass them on), and so on. A ``**kwargs`` that is passed nowhere
    admits no name: a key must be named by some ``__init__``."""
    named: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())[1:]  # without self
        except (TypeError, ValueError):  # no signature (a builtin): no names
            break
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        named.update(p.name for p in params if p.kind in kinds)
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            break
    return frozenset(named)


def resolved(node: Any) -> Any:
    """A config held in memory by its user (a node of `nfcv.compose`'s DictConfig) as plain
    containers, its interpolations resolved. Never for a config read from a file: that is
    resolved data already, and `check_config` refuses interpolations in it."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=False)  # interpolations stay "${...}" text
    return node


def _child(where: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


_SCALARS = (str, int, float, bool, type(None))


def _interpolation(node: Any) -> bool:
    return isinstance(node, str) and "${" in node


def check_config(cfg: Any, source: str, *, where: str = "") -> None:
    """Refuse a stored config (a checkpoint's ``hyper_parameters.cfg``, an export's metadata)
    that asks for more than registered classes, with a `CheckpointError` naming the key, the
    value and `source` (the file). Refused anywhere in it: a string holding ``${`` (an
    interpolation or resolver call: a stored config is resolved, plain data); a ``_target_``
    that is not registered; a key starting with ``_`` other than ``_target_`` and a boolean
    ``_partial_`` beside it (``_args_``, ``_recursive_``, ``_convert_``...); values other than
    dicts, lists, strings, numbers, booleans and null. Under the top-level keys of
    `RECORDED_ONLY` (the run's wiring, never built on load) a ``_target_`` may name any class.
    Whether the keys fit the classes is checked by `build`. `where`: the key path of `cfg` in
    the whole config, for the messages."""
    _check(_plain(cfg), source, where)


def _at(where: str) -> str:
    return where or "<root>"


def _check(node: Any, source: str, where: str, recorded: bool = False) -> None:
    refuse = f"refusing to load {source}: its config"
    if _interpolation(node):
        raise CheckpointError(
            f"{refuse} holds {node!r} at {_at(where)}, an interpolation (OmegaConf resolver "
            "call); a stored config is resolved, plain data"
        )
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = _child(where, key)
            if not isinstance(key, str) or _interpolation(key):
                raise CheckpointError(f"{refuse} has the key {key!r} at {_at(where)}")
            if recorded and key.startswith("_"):  # never built: a record, any class
                if not isinstance(value, _SCALARS):
                    raise CheckpointError(f"{refuse} holds {value!r} at {here}")
                _check(value, source, here, recorded)
            elif key == TARGET:
                if not is_registered(value):
                    raise CheckpointError(
                        f"{refuse} asks to build {value!r} at {_at(where)}, which is not a "
                        "registered class (nfcv.registry: nfcv's own classes and "
                        "torch.optim.Adam, Adamax, AdamW, SGD; a class of your own needs "
                        "nfcv.registry.register(YourClass) before loading)"
                    )
            elif key == PARTIAL:
                if TARGET not in node or not isinstance(value, bool):
                    raise CheckpointError(
                        f"{refuse} has _partial_: {value!r} at {_at(where)}: it must be true or "
                        "false, beside a _target_"
                    )
            elif key.startswith("_"):
                raise CheckpointError(
                    f"{refuse} has the special key {key!r} at {_at(where)}: a stored config may "
                    "only use _target_ and _partial_ (arguments go by name)"
                )
            else:
                _check(value, source, here, recorded or (not where and key in RECORDED_ONLY))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check(value, source, _child(where, i), recorded)
    elif not isinstance(node, _SCALARS):
        raise CheckpointError(
            f"{refuse} holds a {type(node).__name__} at {_at(where)}, not plain config data"
        )


def build(node: Any, *, source: str = "the config", where: str = "") -> Any:
    """Build a config node: what ``hydra.utils.instantiate`` does, for registered classes only.

    `node`: plain containers (a DictConfig or ListConfig is converted without resolving, and an
    interpolation in it is refused: pass `resolved(node)` for a config of your own). A dict with
    ``_target_`` builds the registered class (``_partial_: true``: a `functools.partial` of it)
    from its other keys, each a parameter of the class (`parameters`) and built first; other
    dicts and lists are built item by item and stay plain dicts and lists. Refused with a
    `ConfigError` naming `where` (the key path) and `source`: an unregistered ``_target_``,
    any other key starting with ``_`` (``_args_``, ``_recursive_``, ``_convert_``...), a key
    that is not a parameter, an interpolation. Errors raised by the classes themselves pass
    through unchanged.
    """
    return _build(_plain(node), source, where)


def _refuse_build(source: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"refusing to build {where or 'the config'} of {source}: {what}")


def _build(node: Any, source: str, where: str) -> Any:
    if _interpolation(node):
        raise _refuse_build(
            source, where, f"{node!r} is an interpolation; pass resolved, plain data"
        )
    if isinstance(node, (list, tuple)):
        return [_build(v, source, _child(where, i)) for i, v in enumerate(node)]
    if not isinstance(node, Mapping):
        if not isinstance(node, _SCALARS):
            raise _refuse_build(source, where, f"a {type(node).__name__} is not config data")
        return node
    for key in node:
        if not isinstance(key, str):
            raise _refuse_build(source, _child(where, key), f"the key {key!r} is not a string")
        if key.startswith("_") and key not in (TARGET, PARTIAL):
            raise _refuse_build(
                source,
                _child(where, key),
                f"the special key {key!r} is not accepted (only _target_ and _partial_: "
                "arguments go by name)",
            )
    if TARGET not in node:
        if PARTIAL in node:
            raise _refuse_build(source, where, "_partial_ without _target_")
        return {k: _build(v, source, _child(where, k)) for k, v in node.items()}
    target = node[TARGET]
    try:
        cls = lookup(target)
    except NotRegisteredError as err:
        raise NotRegisteredError(
            f"refusing to build {where or 'the config'} of {source}: {err}"
        ) from None
    partial = node.get(PARTIAL, False)
    if not isinstance(partial, bool):
        raise _refuse_build(source, _child(where, PARTIAL), f"{partial!r} is not true or false")
    allowed = parameters(cls)
    kwargs = {}
    for key, value in node.items():
        if key in (TARGET, PARTIAL):
            continue
        if key not in allowed:
            raise _refuse_build(
                source,
                _child(where, key),
                f"{key!r} is not a parameter of {target} (it takes: "
                f"{', '.join(sorted(allowed)) or 'none'})",
            )
        kwargs[key] = _build(value, source, _child(where, key))
    return functools.partial(cls, **kwargs) if partial else cls(**kwargs)
