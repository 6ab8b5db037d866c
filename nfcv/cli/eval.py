"""nfcv-eval: bits per dim of a checkpoint over a whole data split, with its standard error."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import nfcv
from nfcv.cli.common import checkpoint_arg, device_arg, int_arg
from nfcv.errors import ConfigError, DataError, user_errors
from nfcv.model import ImageFlow


@torch.no_grad()
def per_image_bpd(
    model: ImageFlow,
    loader,
    k: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> torch.Tensor:
    """Bits per dim of every image the loader yields, float64, in loader order."""
    values = []
    for x, _ in tqdm(loader, desc="eval", unit="batch", disable=not progress):
        bpd = model.bits_per_dim(x.to(device), k=k).double().cpu()
        bad = torch.nonzero(~torch.isfinite(bpd)).flatten()
        if len(bad):
            first = sum(len(v) for v in values) + int(bad[0])
            raise DataError(f"bits per dim is not finite for image {first} of the split")
        values.append(bpd)
    return torch.cat(values)


def evaluate(cfg: DictConfig) -> dict:
    ckpt = checkpoint_arg(cfg)
    device = device_arg(cfg.device)
    k, batch_size, seed = int_arg(cfg, "k"), int_arg(cfg, "batch_size"), int_arg(cfg, "seed", 0)
    model = nfcv.load(ckpt, map_location=device)
    data_cfg = OmegaConf.create(OmegaConf.to_container(model.config.data))
    for key in ("root", "download"):
        if cfg.get(key) is not None:
            if key not in data_cfg:
                raise ConfigError(
                    f"{key}= does not apply: the checkpoint's data ({data_cfg.get('name')}) has "
                    f"no {key} option"
                )
            data_cfg[key] = cfg[key]
    data_cfg.eval_batch_size = batch_size
    datamodule = instantiate(data_cfg)
    loader = datamodule.eval_loader(cfg.split)

    torch.manual_seed(seed)  # the dequantization noise: same seed, same figure
    start = time.perf_counter()
    bpd = per_image_bpd(model, loader, k=k, device=device, progress=bool(cfg.progress))
    n = bpd.numel()
    result = {
        "checkpoint": str(ckpt),
        "model": model.config.model.get("name"),
        "data": datamodule.describe(),
        "split": cfg.split,
        "num_images": n,
        "k": k,
        "seed": seed,
        "bpd": bpd.mean().item(),
        "bpd_stderr": (bpd.std(unbiased=True) / math.sqrt(n)).item() if n > 1 else math.nan,
        "seconds": round(time.perf_counter() - start, 2),
        "nfcv_version": nfcv.__version__,
    }
    out = Path(cfg.out) if cfg.out else ckpt.with_name(f"{ckpt.stem}.eval-{cfg.split}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"nfcv: {result['model']} on {result['data']['name']} {cfg.split} "
        f"({n} images, k={result['k']}): {result['bpd']:.4f} +/- {result['bpd_stderr']:.4f} "
        "bits/dim"
        f"\n  json: {out}"
    )
    return result


@hydra.main(version_base="1.3", config_path="pkg://nfcv.configs", config_name="eval")
def main(cfg: DictConfig) -> None:
    with user_errors():
        evaluate(cfg)


if __name__ == "__main__":
    main()
