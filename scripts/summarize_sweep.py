#!/usr/bin/env python3
"""Summarise an nfcv sweep folder into one table: each job's overrides, status, best val bpd,
test bpd, steps and time (and the log of each failed job).

    python3 scripts/summarize_sweep.py outputs/multirun/2026-11-28/12-00-00 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nfcv.training.sweep import collect, format_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the sweep folder (hydra.sweep.dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no sweep folder at {args.sweep_dir}", file=sys.stderr)
        return 2
    rows = collect(args.sweep_dir)
    if not rows:
        print(
            f"error: {args.sweep_dir} holds no job folders (folders with .hydra/); pass the "
            "folder that `nfcv-train -m` printed",
            file=sys.stderr,
        )
        return 2
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["status"] == "completed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
