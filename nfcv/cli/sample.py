"""nfcv-sample: draw a grid of samples from a checkpoint, one row per temperature."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig
from torchvision.utils import save_image

import nfcv
from nfcv.cli.common import checkpoint_arg, device_arg, int_arg
from nfcv.errors import ConfigError, user_errors
from nfcv.grid import sample_grid


def sample(cfg: DictConfig) -> Path:
    ckpt = checkpoint_arg(cfg)
    temps = list(cfg.temperature) if isinstance(cfg.temperature, ListConfig) else [cfg.temperature]
    try:
        temps = [float(t) for t in temps]
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"temperature must be a number or a list of numbers, got {temps}"
        ) from err
    n, nrow, seed = int_arg(cfg, "n"), int_arg(cfg, "nrow"), int_arg(cfg, "seed", minimum=0)
    model = nfcv.load(ckpt, map_location=device_arg(cfg.device))
    out = Path(cfg.out) if cfg.out else ckpt.parent.parent / "samples" / f"{ckpt.stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(model, temps, n, nrow=nrow, seed=seed)
    save_image(grid, out)
    print(f"nfcv: {n} samples per temperature {temps} -> {out}")
    return out


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="sample")
def main(cfg: DictConfig) -> None:
    with user_errors():
        sample(cfg)


if __name__ == "__main__":
    main()
