"""nfcv-export: a checkpoint's model as a safetensors file with its config (`nfcv.checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from nfcv.checkpoint import export_safetensors
from nfcv.cli.common import checkpoint_arg, ema_arg
from nfcv.errors import ConfigError, user_errors
from nfcv.training.runs import expand_checkpoints


def export(cfg: DictConfig) -> Path:
    ckpt = checkpoint_arg(cfg)
    found = expand_checkpoints(str(ckpt))
    if len(found) != 1:
        raise ConfigError(f"ckpt={ckpt} is a sweep of {len(found)} runs: export one run at a time")
    ckpt = found[0]
    out = export_safetensors(ckpt, cfg.get("out"), ema=ema_arg(cfg))
    size = out.stat().st_size / 2**20
    print(f"nfcv: wrote {out} ({size:.1f} MiB) from {ckpt}\n  load: nfcv.load({str(out)!r})")
    return out


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="export")
def main(cfg: DictConfig) -> None:
    with user_errors():
        export(cfg)


if __name__ == "__main__":
    main()
