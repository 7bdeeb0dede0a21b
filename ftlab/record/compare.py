"""Comparing runs (``ftlab-runs --compare RUN RUN ...``): what differs, how they ended, and
their loss curves.

Everything is read from the run dirs: the settings from ``resolved_config.yaml`` (every
value resolved, plus the ``derived`` ones; ``.hydra/config.yaml`` for a run that stopped
before writing it), the final metrics from ``summary.json``, the curves from
``metrics.jsonl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config.overrides import flatten
from ftlab.errors import FtlabError
from ftlab.record.index import RunRecord, is_run_dir, read_run
from ftlab.record.rundir import METRICS, RESOLVED_CONFIG, RunDir

# (summary key, row title, format)
FINAL_METRICS = (
    ("steps", "steps", ""),
    ("first_loss", "train loss, first", ".4f"),
    ("final_loss", "train loss, last", ".4f"),
    ("eval_loss", "eval loss", ".4f"),
    ("eval_ppl", "eval perplexity", ".3f"),
    ("entity_recall_base", "entity recall, base", ".3f"),
    ("entity_recall", "entity recall, tuned", ".3f"),
    ("tokens_per_second", "tokens/s", ".0f"),
    ("peak_memory_mb", "peak memory MiB", ".0f"),
    ("train_seconds", "train s", ".1f"),
    ("wall_seconds", "wall s", ".1f"),
)


@dataclass
class ComparedRun:
    label: str
    record: RunRecord
    settings: dict[str, Any]  # dotted setting -> value
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # train / eval


def load_run(path: Path, label: str) -> ComparedRun:
    if not path.is_dir() or not is_run_dir(path):
        raise FtlabError(
            f"{path} is not a run dir (no .hydra/, status.json or summary.json there)."
        )
    record = read_run(path)
    run_dir = RunDir(path)
    config = run_dir.read_yaml(RESOLVED_CONFIG) or record.config
    curves: dict[str, list[tuple[int, float]]] = {"train": [], "eval": []}
    for line in run_dir.read_jsonl(METRICS):
        if line.get("kind") == "train" and "loss" in line:
            curves["train"].append((int(line["step"]), float(line["loss"])))
        elif line.get("kind") == "eval" and "eval_loss" in line:
            curves["eval"].append((int(line["step"]), float(line["eval_loss"])))
    return ComparedRun(label, record, flatten(config), curves)


def labels_for(paths: list[Path]) -> list[str]:
    """Each run's dir name, with parents added until the names are distinct."""
    depth = 1
    while True:
        names = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth > 8:
            return names
        depth += 1


def differing_settings(runs: list[ComparedRun]) -> list[str]:
    keys = list(dict.fromkeys(k for r in runs for k in r.settings))
    missing = object()
    return [k for k in keys if len({repr(r.settings.get(k, missing)) for r in runs}) > 1]


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def format_comparison(runs: list[ComparedRun], plot: Path | None) -> str:
    names = [chr(ord("A") + i) if i < 26 else str(i) for i in range(len(runs))]
    lines = [f"comparing {len(runs)} runs"]
    lines += [f"  {n}  {r.record.run_dir}" for n, r in zip(names, runs, strict=True)]
    keys = differing_settings(runs)
    lines += ["", f"settings that differ ({len(keys)})"]
    if keys:
        rows = [[k, *(_cell(r.settings.get(k)) for r in runs)] for k in keys]
        lines += _table(["setting", *names], rows)
    else:
        lines.append("  (none: the runs share every setting)")
    lines += ["", "final metrics"]
    rows = [["status", *(r.record.status for r in runs)]]
    for key, title, spec in FINAL_METRICS:
        values = [
            (r.record.wall_seconds if key == "wall_seconds" else r.record.summary.get(key))
            if r.record.summary or key == "wall_seconds"
            else None
            for r in runs
        ]
        rows.append([title, *(_cell(v, spec) for v in values)])
    lines += _table(["metric", *names], rows)
    without = [n for n, r in zip(names, runs, strict=True) if not r.curves["train"]]
    if plot is not None:
        lines += ["", f"loss curves: {plot}"]
        if without:
            lines.append(f"  (no training losses in metrics.jsonl for {', '.join(without)})")
    return "\n".join(lines)


def check_plot_path(path: Path) -> None:
    """Refuse a --plot path matplotlib would not write as named (a directory or a name
    without a suffix get ``.png`` appended; an unknown suffix raises deep in matplotlib)."""
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = sorted(FigureCanvasBase.get_supported_filetypes())
    if path.is_dir():
        raise FtlabError(
            f"--plot {path} is a directory; give a file name such as {path / 'compare.png'}."
        )
    if path.suffix.lstrip(".").lower() not in kinds:
        raise FtlabError(
            f"--plot {path}: the file type {path.suffix or '(none)'} is not one matplotlib "
            f"writes; use one of {', '.join('.' + k for k in kinds)}."
        )


def plot_losses(runs: list[ComparedRun], path: Path) -> None:
    """Train loss (solid) and eval loss (dashed, markers) against the step, one colour per
    run; two panels so that the eval points are not lost among the train line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, kind, style in zip(axes, ("train", "eval"), ("-", "--o"), strict=True):
        for run, color in zip(runs, colors, strict=True):
            points = run.curves[kind]
            if points:
                steps, losses = zip(*points, strict=True)
                ax.plot(steps, losses, style, color=color, label=run.label, markersize=4)
        ax.set_title(f"{kind} loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not any(r.curves[kind] for r in runs):
            ax.text(0.5, 0.5, f"no {kind} losses", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("loss")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(runs), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def compare_runs(paths: list[Path], plot: Path | None) -> tuple[list[ComparedRun], str]:
    """Read the runs, write the plot (when ``plot`` is given), return the printed text."""
    if len(paths) < 2:
        raise FtlabError("--compare needs at least two run dirs.")
    if plot is not None:
        check_plot_path(plot)
    runs = [load_run(p, label) for p, label in zip(paths, labels_for(paths), strict=True)]
    if plot is not None:
        plot_losses(runs, plot)
    return runs, format_comparison(runs, plot)
