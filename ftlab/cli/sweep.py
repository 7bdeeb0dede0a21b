"""``ftlab-sweep SWEEP_DIR``: (re)write the summary of a sweep dir.

For a sweep that was interrupted, so Hydra never called ``on_multirun_end``, or to
refresh it after rerunning a failed job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from ftlab.record.index import is_run_dir
from ftlab.record.sweep import read_sweep, write_sweep_summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``ftlab-sweep``)."""
    parser = argparse.ArgumentParser(prog="ftlab-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    if is_run_dir(args.sweep_dir):  # a finished run is not changed by a later command
        _fail(f"{args.sweep_dir} is one run's directory, not a sweep dir; nothing was written.")
    sweep = read_sweep(args.sweep_dir)
    if not sweep.jobs:
        _fail(f"{args.sweep_dir} holds no run dirs (not a sweep dir); nothing was written.")
    for path in write_sweep_summary(sweep).values():
        print(path)


def _fail(message: str) -> NoReturn:
    print(f"ftlab-sweep: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
