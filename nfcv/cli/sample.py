"""nfcv-sample: pictures from a checkpoint.

``mode=grid`` samples, one row per temperature (Glow's figure); ``interpolate`` the decoded
latent path between real images; ``reconstruct`` real images beside decode(encode(x));
``npz`` raw samples for downstream metrics.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig
from torchvision.utils import save_image

from nfcv.checkpoint import Loaded, load_checkpoint
from nfcv.cli.common import (
    checkpoints_arg,
    choice_arg,
    data_module,
    device_arg,
    ema_arg,
    int_arg,
)
from nfcv.config import MAX_TEMPERATURE, show
from nfcv.data.files import atomic_path, check_output
from nfcv.errors import ConfigError, user_errors
from nfcv.grid import (
    PATHS,
    draw_samples,
    interpolation_grid,
    quantise,
    reconstruction_grid,
    sample_grid,
)
from nfcv.model import ImageFlow

MODES = ("grid", "interpolate", "reconstruct", "npz")


def _temperatures(cfg: DictConfig) -> list[float]:
    """``temperature=``: one or more numbers in [0, MAX_TEMPERATURE] (nan, inf or 1e6 would
    draw NaN or saturated images without a word)."""
    temps = list(cfg.temperature) if isinstance(cfg.temperature, ListConfig) else [cfg.temperature]
    ok = [
        isinstance(t, int | float) and not isinstance(t, bool) and 0 <= t <= MAX_TEMPERATURE
        for t in temps  # False for NaN
    ]
    if not temps or not all(ok):
        raise ConfigError(
            f"temperature must be one or more numbers in [0, {MAX_TEMPERATURE:g}] (1: the "
            f"model's distribution), got temperature={show(temps)}"
        )
    return [float(t) for t in temps]


def _index(cfg: DictConfig) -> list[int]:
    values = list(cfg.index) if isinstance(cfg.index, ListConfig) else [cfg.index]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
        raise ConfigError(f"index must be a list of image numbers, got index={show(values)}")
    return values


def _real_images(cfg: DictConfig, loaded: Loaded, index: list[int]) -> torch.Tensor:
    """Images `index` of split `cfg.split` of the checkpoint's data (or ``data=``)."""
    dataset = data_module(cfg, loaded).split(str(cfg.split))
    size = len(dataset)
    bad = [i for i in index if not 0 <= i < size]
    if bad and cfg.mode == "reconstruct":
        raise ConfigError(
            f"n={len(index)}: mode=reconstruct shows n images of the {cfg.split} split, which "
            f"has {size}: use n <= {size}"
        )
    if bad:  # one line, however many: the first few
        listed = f"{bad[:5]}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(
            f"index {listed} out of range: the {cfg.split} split has {size} images (0..{size - 1})"
        )
    return torch.stack([dataset[i][0] for i in index])


def _label(cfg: DictConfig, model: ImageFlow) -> int | None:
    """``label=`` for class-conditional sampling, checked against the model."""
    label = cfg.get("label")
    if label is None:
        return None
    if not model.num_classes:
        raise ConfigError(
            "label= needs a class-conditional checkpoint (trained with model.conditional=true); "
            "this one models p(x) without labels"
        )
    try:
        label = int(label)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"label must be a class number, got {label!r}") from err
    if not 0 <= label < model.num_classes:
        raise ConfigError(f"label must be in [0, {model.num_classes - 1}], got {label}")
    return label


def _denoise_sigma(cfg: DictConfig, model: ImageFlow, mode: str) -> float | None:
    """``denoise=true``: Tweedie's one-step denoising (`ImageFlow.denoise`) at the noise level the
    model was trained with (``dequant=gaussian``), or at ``denoise_sigma=``; None: off."""
    denoise, sigma = cfg.get("denoise", False), cfg.get("denoise_sigma")
    if not isinstance(denoise, bool):
        raise ConfigError(f"denoise must be true or false, got denoise={show(denoise)}")
    if not denoise:
        if sigma is not None:
            raise ConfigError(
                "denoise_sigma= is the noise level of denoise=true: add denoise=true, or drop "
                "denoise_sigma="
            )
        return None
    if mode == "reconstruct":
        raise ConfigError(
            "denoise=true works on images the model generates (mode=grid, npz, interpolate); "
            "mode=reconstruct shows decode(encode(x)) of real images: drop denoise=true"
        )
    if mode == "interpolate" and model.num_classes:
        raise ConfigError(
            "denoise=true with mode=interpolate needs the density of the path's images, which a "
            "class-conditional model has only given a class: denoise grids (mode=grid label=...) "
            "or interpolate without denoise=true"
        )
    if sigma is None:
        if model.noise_std is None:
            raise ConfigError(
                "denoise=true needs the noise level the model was trained with, and this "
                "checkpoint was trained without Gaussian noise "
                f"({type(model.dequantizer).__name__}; dequant=gaussian trains with it): give "
                "denoise_sigma=S to denoise at level S anyway"
            )
        return model.noise_std
    ok = isinstance(sigma, int | float) and not isinstance(sigma, bool) and 0 < sigma < 1e3
    if not ok:  # False for NaN
        raise ConfigError(
            f"denoise_sigma must be a number > 0 (a noise level in [0, 1] image units, e.g. "
            f"0.05), got denoise_sigma={show(sigma)}"
        )
    return float(sigma)


def _guidance(cfg: DictConfig, model: ImageFlow, mode: str):
    """``guidance=G guidance_anneal= attn_temp=``: TarFlow's guided sampling, or None (G = 0)."""
    from nfcv.flows.tarflow import Guidance

    g, temp = cfg.get("guidance", 0), cfg.get("attn_temp")
    ok = isinstance(g, int | float) and not isinstance(g, bool) and 0 <= g <= MAX_TEMPERATURE
    if not ok:
        raise ConfigError(f"guidance must be a number >= 0 (0: none), got guidance={show(g)}")
    if temp is not None and not (
        isinstance(temp, int | float) and not isinstance(temp, bool) and 0 < temp <= 100
    ):
        raise ConfigError(f"attn_temp must be a number in (0, 100], got attn_temp={show(temp)}")
    if g == 0:
        return None
    if mode not in ("grid", "npz"):
        raise ConfigError(f"guidance= guides sampling (mode=grid or npz), not mode={mode}")
    if not hasattr(model.flow, "label_conditional"):
        raise ConfigError(
            f"guidance={show(g)} needs a TarFlow checkpoint (model=tarflow): its guidance acts "
            f"on the (a, b) of each token; this checkpoint is "
            f"{(model.config or {}).get('model', {}).get('name', type(model.flow).__name__)}"
        )
    if not model.labels_in_flow and (temp is None or temp == 1):
        raise ConfigError(
            "this TarFlow is unconditional, so guidance= is attention-temperature guidance: set "
            "attn_temp to a temperature other than 1 (e.g. attn_temp=1.5), or sample a "
            "class-conditional TarFlow (model.conditional=true) for classifier-free guidance"
        )
    return Guidance(float(g), bool(cfg.get("guidance_anneal", False)), float(temp or 1.0))


NPZ_KEYS = {"images", "images_float", "temperature", "num_bins"}
NPZ = "an nfcv-sample npz"


def _is_samples_npz(path: Path) -> bool:
    """Whether `path` is an npz that nfcv-sample wrote (one it may replace)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return set(f.files) >= NPZ_KEYS
    except Exception:  # not an npz at all
        return False


def _save_grid(grid: torch.Tensor, out: Path) -> None:
    with atomic_path(out) as tmp:  # the suffix of `out`, which gives the format
        save_image(grid, tmp)


def _default_out(ckpt: Path, mode: str) -> Path:
    suffix = {"grid": ".png", "npz": ".npz"}.get(mode, f".{mode}.png")
    return ckpt.parent.parent / "samples" / f"{ckpt.stem}{suffix}"


def sample(cfg: DictConfig) -> Path:
    """Run nfcv-sample; returns the path written."""
    ckpts = checkpoints_arg(cfg)
    if len(ckpts) != 1:
        raise ConfigError(f"nfcv-sample takes one checkpoint, got {len(ckpts)}: {ckpts}")
    ckpt = ckpts[0]
    mode = choice_arg(cfg, "mode", MODES)
    n, nrow, seed = int_arg(cfg, "n"), int_arg(cfg, "nrow"), int_arg(cfg, "seed", minimum=0)
    temps = _temperatures(cfg)
    if mode == "interpolate":
        steps = int_arg(cfg, "steps", minimum=2)
        path = choice_arg(cfg, "path", PATHS)
        index = _index(cfg)
        if len(index) < 2:
            raise ConfigError(
                f"mode=interpolate needs at least 2 images, got index={index}: e.g. index=[0,1]"
            )
    batch_size = int_arg(cfg, "batch_size")
    loaded = load_checkpoint(ckpt, map_location=device_arg(cfg.device), ema=ema_arg(cfg))
    model = loaded.model
    out = Path(cfg.out) if cfg.out else _default_out(ckpt, mode)
    check_output(out, _is_samples_npz if mode == "npz" else None, NPZ)  # before the work
    weights = " (EMA weights)" if loaded.uses_ema else ""
    sigma = _denoise_sigma(cfg, model, mode)
    if sigma is not None:
        weights += f", denoised by Tweedie's formula (sigma {sigma:g})"
    guidance = _guidance(cfg, model, mode)
    guided = f", guidance {guidance}" if guidance else ""

    if mode == "grid":
        label = _label(cfg, model)
        grid = sample_grid(
            model,
            temps,
            n,
            nrow=nrow,
            seed=seed,
            label=label,
            guidance=guidance,
            denoise_sigma=sigma,
        )
        _save_grid(grid, out)
        print(f"nfcv: {n} samples per temperature {temps}{weights}{guided} -> {out}")
    elif mode == "interpolate":
        x = _real_images(cfg, loaded, index)
        grid, error = interpolation_grid(model, x, steps=steps, path=path, denoise_sigma=sigma)
        _save_grid(grid, out)
        print(
            f"nfcv: {path} interpolation through {cfg.split} images {index}, {steps} per "
            f"segment{weights}; endpoints decode to the images to max abs error {error:.2e} "
            f"-> {out}"
        )
    elif mode == "reconstruct":
        x = _real_images(cfg, loaded, list(range(n)))
        grid, error = reconstruction_grid(model, x, nrow=nrow)
        _save_grid(grid, out)
        print(
            f"nfcv: {n} {cfg.split} images (rows) above decode(encode(x)){weights}: max abs "
            f"error {error:.2e} -> {out}"
        )
    else:
        images, temperature = draw_samples(
            model,
            temps,
            n,
            batch_size=batch_size,
            seed=seed,
            guidance=guidance,
            denoise_sigma=sigma,
        )
        levels = quantise(model, images)
        # Through a temporary file (a full disk leaves no truncated .npz), written as a file
        # object: the name is `out` as given, without the .npz that np.savez would append.
        with atomic_path(out, _is_samples_npz, NPZ) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                images=levels.numpy().astype(np.uint8 if model.num_bins <= 256 else np.uint16),
                images_float=images.float().numpy(),
                temperature=temperature.float().numpy(),
                num_bins=np.int64(model.num_bins),
            )
        print(
            f"nfcv: {len(images)} samples ({n} per temperature {temps}){weights}{guided}, "
            f"shape {tuple(images.shape)}, levels 0..{model.num_bins - 1} -> {out}"
        )
    return out


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
