"""``ftlab-runs``: the runs under ``outputs/`` (or a given dir), newest first.

``ftlab-runs`` prints a table (time, status, model, method, stage, key settings, losses, entity
recall, run dir) and, below it, the error of every failed run; ``--json`` prints the
same fields for scripts. ``--compare RUN RUN ...`` puts runs side by side
(``ftlab.record.compare``): the settings that differ, the final metrics, and a PNG of their
train and eval loss curves. Single runs and sweep jobs are listed alike: both are run dirs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError
from ftlab.models.config_json import model_label
from ftlab.record.compare import compare_runs
from ftlab.record.index import RunRecord, list_runs
from ftlab.record.status import FAILED
from ftlab.record.summary import Summary

# (field, column title, format)
COLUMNS = (
    ("time", "time", ""),
    ("status", "status", ""),
    ("model", "model", ""),
    ("method", "method", ""),
    ("stage", "stage", ""),
    ("lr", "lr", "g"),
    ("steps", "steps", ""),
    ("rank", "rank", ""),
    ("parallel", "parallel", ""),
    ("precision", "precision", ""),
    ("final_loss", "loss", ".4f"),
    ("eval_loss", "eval", ".4f"),
    ("entity_recall", "recall", ".3f"),
    ("best", "best", ""),
    ("run_dir", "run dir", ""),
)

OPTIONAL = ("best",)  # train.metric_for_best_model runs only


def run_fields(run: RunRecord, root: Path) -> dict[str, Any]:
    """One listing row. ``steps`` is the steps taken when the run recorded them, else the
    configured ``train.max_steps``."""
    summary = run.summary or Summary()
    steps = summary.steps
    return {
        "time": run.started.astimezone().strftime("%Y-%m-%d %H:%M:%S"),  # local time
        "status": run.status,
        "model": summary.get("model")
        or model_label(run.setting("model.name"), run.setting("model.name_or_path")),
        "method": summary.get("method") or run.setting("method.name"),
        # Runs from before stages existed were SFT.
        "stage": summary.get("stage") or run.setting("stage.name") or "sft",
        "lr": run.setting("train.learning_rate"),
        "steps": steps if steps is not None else run.setting("train.max_steps"),
        "rank": run.rank,
        "parallel": run.setting("parallel.name"),
        "precision": run.setting("precision.name"),
        "final_loss": summary.get("final_loss"),
        "eval_loss": summary.get("eval_loss"),
        "entity_recall": summary.get("entity_recall"),
        "best": best_label(summary),
        "stopped_early_at": summary.stopped_early_at,
        "run_dir": _relative(run.run_dir, root),
        "error": run.error,
    }


def best_label(summary: Summary) -> str | None:
    """``step 2 loss 1.4884``: the best checkpoint, and where early stopping ended the run."""
    b = summary.best_checkpoint or {}
    if not b:
        return None
    text = f"step {b['step']} {b['metric']} {b['value']:.4f}"
    if summary.stopped_early_at is not None:
        text += f" (stopped at {summary.stopped_early_at})"
    return text


def format_table(rows: list[dict[str, Any]]) -> str:
    """Left-aligned columns; ``-`` where a run has no value. A column only some runs can
    have (``OPTIONAL``) is shown when one of the listed runs has it."""
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(r[c[0]] for r in rows)]
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([_format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in cells
    ]
    return "\n".join(lines)


def format_listing(rows: list[dict[str, Any]]) -> str:
    """The table, then one line per failed run with its error."""
    text = format_table(rows)
    failed = [r for r in rows if r["status"] == FAILED]
    if failed:
        text += "\n\nfailed runs:\n" + "\n".join(f"  {r['run_dir']}: {r['error']}" for r in failed)
    return text


def _format(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) if path != root else str(path)
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ftlab-runs", description="List ftlab runs, newest first."
    )
    parser.add_argument(
        "root",
        nargs="?",
        default="outputs",
        type=Path,
        help="directory to search for run dirs (default: outputs)",
    )
    parser.add_argument("-n", "--limit", type=int, default=None, help="show only the N newest runs")
    parser.add_argument(
        "--status",
        choices=("completed", "failed", "interrupted", "running", "incomplete"),
        help="show only runs with this status",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN",
        type=Path,
        help="compare these run dirs: settings that differ, final metrics, loss curves",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=Path("compare.png"),
        help="where --compare writes the loss curves (default: compare.png)",
    )
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> None:
    paths = [p if p.exists() or p.is_absolute() else args.root / p for p in args.compare]
    _, text = compare_runs(paths, args.plot)
    print(text)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``ftlab-runs``)."""
    args = parse_args(argv)
    if args.limit is not None and args.limit < 1:
        print(f"ftlab-runs: error: -n {args.limit}: give a number of runs >= 1.", file=sys.stderr)
        sys.exit(2)
    if args.compare:
        try:
            compare(args)
        except FtlabError as err:
            print(f"ftlab-runs: error: {err}", file=sys.stderr)
            sys.exit(2)
        return
    if not args.root.is_dir():
        print(
            f"ftlab-runs: error: {args.root} is not a directory (give the directory "
            "ftlab wrote its runs to).",
            file=sys.stderr,
        )
        sys.exit(2)
    try:
        runs = list_runs(args.root)
    except FtlabError as err:
        print(f"ftlab-runs: error: {err}", file=sys.stderr)
        sys.exit(2)
    rows = [run_fields(r, args.root) for r in runs]
    if args.status:
        rows = [r for r in rows if r["status"] == args.status]
    rows = rows[: args.limit] if args.limit is not None else rows
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs under {args.root}")
    else:
        print(format_listing(rows))


if __name__ == "__main__":
    main()
