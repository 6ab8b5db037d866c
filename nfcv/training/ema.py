"""An exponential moving average (EMA) of a model's weights, kept during training.

Averaged weights usually score a lower held-out bits per dim and give cleaner samples than the
last iterate (Polyak & Juditsky 1992; used for flows e.g. by Flow++, arXiv:1902.00275). nfcv
keeps the average in a second copy of the model, updated after every optimizer step, and stores
its weights in checkpoints as ``ema_state_dict`` (the model's own keys, no ``model.`` prefix)
beside ``ema`` (``{"decay": float, "num_updates": int}``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from nfcv.checkpoint import EMA_INFO as INFO_KEY
from nfcv.checkpoint import EMA_STATE as STATE_KEY
from nfcv.errors import ConfigError


class EMA:
    """``ema = d * ema + (1 - d) * weights`` after each optimizer step.

    The copy is made at the first update, not before training, so data-dependent initialisations
    (ActNorm's first batch) are in it from the start rather than averaged in from zero. The decay
    ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates n (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``), so a short run is not dominated by the
    untrained weights. Buffers (masks, permutations, ActNorm's flag) are copied, not averaged.

    Deliberately a plain object, not an `nn.Module`: the averaged copy must not be registered
    in the owner's parameters (the optimizer would see it) or state_dict (the checkpoint keeps it
    under its own key).
    """

    def __init__(self, decay: float, factory: Callable[[], nn.Module]):
        try:
            decay = float(decay)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"ema.decay must be a number in (0, 1) or null, got {decay!r}"
            ) from err
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"ema.decay must be in (0, 1) (typical: 0.999) or null, got {decay}")
        self.decay = decay
        self.factory = factory
        self.model: nn.Module | None = None
        self.num_updates = 0

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def _follow(self, source: nn.Module) -> nn.Module:
        """The averaged copy, on the device and in the dtype of `source`."""
        assert self.model is not None
        ref = next(iter(source.parameters()), None)
        mine = next(iter(self.model.parameters()), None)
        moved = ref is not None and mine is not None and ref.device != mine.device
        if moved or (ref is not None and mine is not None and ref.dtype != mine.dtype):
            self.model.to(device=ref.device, dtype=ref.dtype)
        return self.model

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` into the average (call after an optimizer step)."""
        if self.model is None:
            self.model = self.factory()
            self.model.load_state_dict(model.state_dict())
            self.model.requires_grad_(False).eval()
            self._follow(model)
        else:
            ema = self._follow(model)
            weight = 1.0 - self.current_decay()
            ema_params = [p for p in ema.parameters()]
            params = [p.detach() for p in model.parameters()]
            torch._foreach_lerp_(ema_params, params, weight)
            for mine, theirs in zip(ema.buffers(), model.buffers(), strict=True):
                mine.copy_(theirs)
        self.num_updates += 1

    def averaged(self, like: nn.Module) -> nn.Module | None:
        """The averaged model (eval mode, on `like`'s device), or None before the first update."""
        return None if self.model is None else self._follow(like)

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Write the average into a checkpoint dict (nothing before the first update)."""
        if self.model is None:
            return
        checkpoint[STATE_KEY] = self.model.state_dict()
        checkpoint[INFO_KEY] = {"decay": self.decay, "num_updates": self.num_updates}

    def restore(self, checkpoint: Mapping[str, Any]) -> None:
        """Read the average back from a checkpoint; one without it resets the average."""
        state = checkpoint.get(STATE_KEY)
        if state is None:
            self.model, self.num_updates = None, 0
            return
        model = self.factory()
        model.load_state_dict(state)
        self.model = model.requires_grad_(False).eval()
        self.num_updates = int((checkpoint.get(INFO_KEY) or {}).get("num_updates", 0))
