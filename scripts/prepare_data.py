"""Fetch and verify a dataset once, on a machine with internet, for machines without it.

    python scripts/prepare_data.py NAME ROOT              # download (where possible) and verify
    python scripts/prepare_data.py NAME ROOT --no-download   # only verify files already there

NAME is a data config (configs/data/NAME.yaml); ROOT becomes its ``data.root``. The script
builds that data module with ``download=true`` (torchvision's downloaders, where it has one),
sets up every split, which checks every file (torchvision's MD5s where it lists them, IDX
headers, pickles, .mat files, npz batches, every image decoded) and caches their sha256 in
$NFCV_CACHE, and prints the record a run will store (``describe()``). Compute nodes then read
ROOT with ``NFCV_DATA=ROOT nfcv-train data=NAME`` (or ``data.root=ROOT``). ImageNet 32/64 and
CelebA-HQ cannot be downloaded by script: it says where to get them and verifies them; for
ImageNet it also writes the memory-mapped copy under $NFCV_CACHE (share that folder, or let the
first run on each machine write its own).

Exit status 0 when verified, 2 with one message (no traceback) when not.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def data_names() -> list[str]:
    """The data configs shipped with nfcv (configs/data/*.yaml)."""
    import importlib.resources

    root = importlib.resources.files("nfcv.configs").joinpath("data")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _parser(names: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Download (where possible) and verify a dataset for nfcv.",
    )
    parser.add_argument("name", metavar="NAME", help=f"a data config: {', '.join(names)}")
    parser.add_argument("root", metavar="ROOT", help="the data root (data.root / NFCV_DATA)")
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="only verify files already under ROOT (no network)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="more data config overrides, e.g. extra=true for svhn",
    )
    return parser


def prepare(name: str, root: str, download: bool = True, overrides: Sequence[str] = ()) -> dict:
    """Build data config `name` at `root`, set up every split (downloading if `download`, and
    checking every file), and return its record (`describe()`). Raises `nfcv.errors.NfcvError`."""
    from hydra.errors import HydraException
    from hydra.utils import instantiate
    from omegaconf.errors import OmegaConfBaseException

    import nfcv
    from nfcv.errors import ConfigError

    try:
        cfg = nfcv.compose([f"data={name}", *(f"data.{o}" for o in overrides)])
        if "root" in cfg.data:  # digits has none: it ships inside scikit-learn
            cfg.data.root = root
            cfg.data.download = download
        datamodule = instantiate(cfg.data)
    except (HydraException, OmegaConfBaseException) as err:  # also wraps constructor errors
        raise ConfigError(f"cannot build data={name}: {str(err).splitlines()[0]}") from err
    datamodule.setup()
    return datamodule.describe()


def main(argv: Sequence[str] | None = None) -> int:
    names = data_names()
    args = _parser(names).parse_intermixed_args(argv)
    from nfcv.errors import EXIT_USER_ERROR, NfcvError

    if args.name not in names:
        print(
            f"prepare_data.py: error: unknown dataset {args.name!r}; use one of: "
            f"{', '.join(names)}",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        print(f"prepare_data.py: error: overrides are KEY=VALUE, got {bad}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        record = prepare(args.name, args.root, not args.no_download, args.overrides)
    except NfcvError as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(record, indent=2))
    files = record.get("files") or {}
    print(
        f"\n{args.name}: verified under {args.root} ({files.get('count', '?')} files, sha256 "
        f"{files.get('sha256', 'not computed')}).\nOn machines without internet: "
        f"NFCV_DATA={args.root} nfcv-train data={args.name}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
