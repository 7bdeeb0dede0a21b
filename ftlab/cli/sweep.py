"""``ftlab-sweep SWEEP_DIR``: (re)write the summary of a sweep dir.

For a sweep that was interrupted, so Hydra never called ``on_multirun_end``, or to
refresh it after rerunning a failed job.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ftlab.record.sweep import read_sweep, write_sweep_summary


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``ftlab-sweep``)."""
    parser = argparse.ArgumentParser(prog="ftlab-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    for path in write_sweep_summary(read_sweep(args.sweep_dir)).values():
        print(path)


if __name__ == "__main__":
    main()
