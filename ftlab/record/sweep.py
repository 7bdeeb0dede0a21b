"""Sweep summary: one table and one plot for all the jobs of a ``ftlab -m`` sweep.

Registered in ``conf/train.yaml`` under ``hydra.callbacks``: after the last job Hydra
calls ``SweepSummary.on_multirun_end``, which writes ``summary.csv``, ``summary.md`` and
``summary.png`` into the sweep dir. It reads the job dirs rather than Hydra's job
returns: with the joblib launcher the jobs ran in other processes, and a failed job's
only record is its ``status.json``.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ftlab.errors import FtlabError
from ftlab.record.index import RunRecord, is_run_dir, read_run
from ftlab.record.rundir import AUTO_LAYOUT, MLFLOW_PARENT, RunDir
from ftlab.record.status import COMPLETED, FAILED, INCOMPLETE, INTERRUPTED

log = logging.getLogger(__name__)

# (summary key, column title, format in summary.md)
METRICS = (
    ("final_loss", "final train loss", ".4f"),
    ("eval_loss", "eval loss", ".4f"),
    ("entity_recall", "entity recall", ".3f"),
    ("tokens_per_second", "tokens/s", ".0f"),
    ("peak_memory_mb", "peak memory MiB", ".0f"),
    ("wall_seconds", "wall s", ".1f"),
)
DOES_NOT_FIT = "does not fit"  # parallel=auto found no layout; nothing was launched
PLOTTED = ("final_loss", "eval_loss", "entity_recall", "tokens_per_second")
ERROR_CHARS = 160  # an error message is cut to this length in summary.md
LOG_SCALE_RATIO = 20  # numeric swept values spanning this factor get a log axis
MAX_TICKS = 12  # up to this many distinct x values each get a labelled tick
MAX_TICK_CHARS = 8  # ... when each is written in at most this many characters


class SweepFailed(FtlabError):
    """Some jobs of a sweep failed; the summary is written. ``ftlab -m`` exits 1."""

    exit_code = 1


class SweepSummary(Callback):
    """Hydra callback: write the sweep summary once every job of a sweep has ended.

    A sweep in which a job failed must make ``ftlab -m`` exit non-zero (so a scheduler or
    a script notices), with every job recorded in the summary. Hydra turns an exception
    raised in a callback into a warning, so the failure is kept for the command to raise
    once Hydra returns (``sweep_failure``).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = summarize_sweep(Path(config.hydra.sweep.dir))
        _OUTCOME[:] = [sweep]


_OUTCOME: list[Sweep] = []  # the last sweep this process summarised


def sweep_failure() -> SweepFailed | None:
    """``SweepFailed`` for the last sweep summarised here when a job failed, else None."""
    if not _OUTCOME or not _OUTCOME[0].failed:
        return None
    sweep = _OUTCOME[0]
    return SweepFailed(
        f"{len(sweep.failed)} of {len(sweep.jobs)} jobs failed: "
        + "; ".join(f"job {j.job_num} ({j.error})" for j in sweep.failed)
        + f". Summary: {sweep.sweep_dir / 'summary.md'}"
    )


def summarize_sweep(sweep_dir: Path) -> Sweep:
    """Read the sweep dir and write its summary files; return what was read."""
    sweep = read_sweep(sweep_dir)
    written = write_sweep_summary(sweep)
    if (sweep_dir / MLFLOW_PARENT).exists():  # train.report_to=mlflow: close the parent run
        from ftlab.training.mlflow_tracker import finish_sweep

        finish_sweep(sweep_dir, list(written.values()))
    log.debug("sweep summary: %s", ", ".join(str(p) for p in written.values()))
    # The console of a sweep: one line per job (ftlab.cli.app), then this; a failed job
    # makes the sweep's exit status non-zero (``sweep_failure``).
    print(console_summary(summary_rows(sweep), sweep, written), flush=True)
    return sweep


@dataclass
class Sweep:
    """The jobs of one sweep dir and what was varied between them."""

    sweep_dir: Path
    jobs: list[RunRecord]
    values: list[dict[str, str]]  # each job's overrides as key -> value
    swept: list[str]  # override keys whose value differs between jobs
    common: list[str]  # overrides (key=value) every job shares

    @property
    def failed(self) -> list[RunRecord]:
        """Jobs that failed. A plan in which ``parallel=auto`` found no layout that fits is
        an answer, not a failure (its row says ``does not fit``); a training job that could
        not start for that reason failed."""
        return [
            j
            for j in self.jobs
            if j.status == FAILED and not (j.setting("mode") == "plan" and auto_layout(j)[1])
        ]


def parse_overrides(overrides: list[str]) -> dict[str, str]:
    """``["method.lora_rank=4", "~x"]`` -> ``{"method.lora_rank": "4", "~x": ""}``."""
    parsed = {}
    for item in overrides:
        key, _, value = item.partition("=")
        parsed[key] = value
    return parsed


def read_sweep(sweep_dir: Path) -> Sweep:
    """Read every job dir directly under ``sweep_dir``, in job-number order."""
    jobs = [read_run(p) for p in sorted(sweep_dir.iterdir()) if p.is_dir() and is_run_dir(p)]
    jobs.sort(key=lambda j: (j.job_num is None, j.job_num or 0, str(j.run_dir)))
    values = [parse_overrides(j.overrides) for j in jobs]
    keys = list(dict.fromkeys(k for v in values for k in v))
    swept = [k for k in keys if len({v.get(k) for v in values}) > 1]
    common = [f"{k}={values[0][k]}" for k in keys if k not in swept]
    return Sweep(sweep_dir, jobs, values, swept, common)


def auto_layout(job: RunRecord) -> tuple[str | None, bool]:
    """What ``parallel=auto`` decided for a job: (the chosen layout, or "does not fit: needs
    X GiB per device, has Y"; True when nothing fitted). (None, False) without auto."""
    run_dir = RunDir(job.run_dir)
    if not run_dir.exists(AUTO_LAYOUT):
        return None, False
    decision = run_dir.read_json(AUTO_LAYOUT)
    if decision.get("chosen_label"):
        return decision["chosen_label"], False
    return decision.get("does_not_fit") or "does not fit: no candidate passed validation", True


def summary_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per job: job number, swept values, status, metrics, run dir, error.

    With ``parallel=auto`` a row also says which layout auto chose; a job for which no
    layout fitted (it stopped before launching) has the status ``does not fit``.
    """
    rows = []
    for job, values in zip(sweep.jobs, sweep.values, strict=True):
        row: dict[str, Any] = {"job": job.job_num}
        row.update({k: values.get(k) for k in sweep.swept})
        layout, no_fit = auto_layout(job)
        row["status"] = DOES_NOT_FIT if no_fit and job.status == FAILED else job.status
        row["layout"] = layout
        for key, _, _ in METRICS:
            summary = job.summary
            row[key] = (
                job.wall_seconds
                if key == "wall_seconds"
                else (summary.get(key) if summary else None)
            )
        row["run_dir"] = job.run_dir.name
        row["error"] = job.error or ""
        rows.append(row)
    return rows


def write_sweep_summary(sweep: Sweep) -> dict[str, Path]:
    """Write ``summary.csv``, ``summary.md`` and ``summary.png``; return their paths."""
    if not sweep.jobs:
        log.warning("sweep dir %s holds no job dirs; the summary is empty", sweep.sweep_dir)
    rows = summary_rows(sweep)
    paths = {ext: sweep.sweep_dir / f"summary.{ext}" for ext in ("csv", "md", "png")}
    write_csv(rows, sweep, paths["csv"])
    paths["md"].write_text(summary_markdown(rows, sweep))
    plot_sweep(rows, sweep, paths["png"])
    return paths


def console_summary(rows: list[dict[str, Any]], sweep: Sweep, written: dict[str, Path]) -> str:
    """The sweep's end on the console: counts, the best job, where the summary is."""
    statuses = sorted({r["status"] for r in rows})
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in statuses)
    lines = [f"sweep summary: {len(rows)} jobs ({counts or 'none'}) in {sweep.sweep_dir}"]
    scored = [r for r in rows if r["eval_loss"] is not None]
    if scored:
        best = min(scored, key=lambda r: r["eval_loss"])
        swept = ", ".join(f"{k}={_swept_cell(best[k])}" for k in sweep.swept)
        lines.append(
            f"  best eval loss {best['eval_loss']:.4f}: job {best['job']}"
            + (f" ({swept})" if swept else "")
        )
    lines.append("  " + ", ".join(p.name for p in written.values()))
    return "\n".join(lines)


def _layout_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The layout column, when a job of the sweep used parallel=auto."""
    return ["layout"] if any(r["layout"] for r in rows) else []


def write_csv(rows: list[dict[str, Any]], sweep: Sweep, path: Path) -> None:
    columns = ["job", *sweep.swept, "status", *_layout_columns(rows)]
    columns += [*(m[0] for m in METRICS), "run_dir", "error"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in columns})


def summary_markdown(rows: list[dict[str, Any]], sweep: Sweep) -> str:
    """The table a person reads first: swept values, outcome and metrics of every job."""
    done = sum(r["status"] == COMPLETED for r in rows)
    statuses = sorted({r["status"] for r in rows})
    counts = ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in statuses)
    lines = [
        f"# Sweep summary: {sweep.sweep_dir.name}",
        "",
        f"- sweep dir: `{sweep.sweep_dir.resolve()}`",
        f"- jobs: {len(rows)} ({counts or 'none'})",
        f"- common overrides: {' '.join(f'`{c}`' for c in sweep.common) or 'none'}",
    ]
    scored = [r for r in rows if r["eval_loss"] is not None]
    if scored:
        best = min(scored, key=lambda r: r["eval_loss"])
        swept = ", ".join(f"{k}={_swept_cell(best[k])}" for k in sweep.swept)
        lines.append(
            f"- best eval loss: {best['eval_loss']:.4f}, job {best['job']}"
            + (f" ({swept})" if swept else "")
        )
    elif done:
        lines.append("- best eval loss: n/a (no job reported one)")
    layout = _layout_columns(rows)
    header = ["job", *sweep.swept, "status", *layout, *(m[1] for m in METRICS), "run dir", "error"]
    align = ["---:", *(["---"] * (len(sweep.swept) + 1 + len(layout)))]
    align += [*(["---:"] * len(METRICS)), "---", "---"]
    lines += ["", _md_row(header), _md_row(align)]
    for row in rows:
        cells = [_cell(row["job"]), *(_swept_cell(row[k]) for k in sweep.swept), row["status"]]
        cells += [_cell(row[k]) for k in layout]
        cells += [_cell(row[key], spec) for key, _, spec in METRICS]
        cells += [f"`{row['run_dir']}`", _error_cell(row["error"])]
        lines.append(_md_row(cells))
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(value: Any, spec: str = "") -> str:
    return "" if value is None else format(value, spec)


def _swept_cell(value: str | None) -> str:
    # Optuna proposes values like 0.0031622776601683794; four digits read better.
    number = _number(value)
    if number is None or "." not in str(value):
        return "" if value is None else str(value)
    return format(number, ".4g")


def _error_cell(error: str) -> str:
    text = " ".join(error.split()).replace("|", "\\|")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class XAxis:
    """Where each job sits on the plots' x axis."""

    label: str
    positions: list[float]  # one per job
    ticks: list[float]
    tick_labels: list[str]
    log: bool


def x_axis(rows: list[dict[str, Any]], sweep: Sweep) -> XAxis:
    """The swept key with the most distinct values (the job number when nothing was swept);
    numeric values on a numeric axis, logarithmic when they span a factor of 20 or more."""
    key = max(sweep.swept, key=lambda k: len({r[k] for r in rows})) if sweep.swept else None
    raw = [r[key] if key else r["job"] for r in rows]
    numbers = [_number(v) for v in raw]
    if raw and all(n is not None for n in numbers):
        names = {n: str(v) for n, v in zip(numbers, raw, strict=True)}  # as typed: 3e-3
        ticks = sorted(names)
        log_x = ticks[0] > 0 and ticks[-1] / ticks[0] >= LOG_SCALE_RATIO
        if any(len(name) > MAX_TICK_CHARS for name in names.values()):
            ticks = []  # sampled values (Optuna): matplotlib's own ticks read better
        return XAxis(key or "job", numbers, ticks, [names[t] for t in ticks], log_x)
    categories = list(dict.fromkeys(str(v) for v in raw))
    return XAxis(
        key or "job",
        [float(categories.index(str(v))) for v in raw],
        [float(i) for i in range(len(categories))],
        categories,
        False,
    )


def plot_sweep(rows: list[dict[str, Any]], sweep: Sweep, path: Path) -> None:
    """The main metrics against the swept values, one panel per metric.

    The swept keys other than the x axis's split the jobs into one line per combination;
    failed and incomplete jobs are marked at the bottom of every panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    axis = x_axis(rows, sweep)
    others = [k for k in sweep.swept if k != axis.label]
    labels = [", ".join(f"{k}={r[k]}" for k in others) for r in rows]
    titles = {key: title for key, title, _ in METRICS}

    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    for i, metric in enumerate(PLOTTED):
        ax = fig.add_subplot(2, 2, i + 1)
        plotted = False
        for series in dict.fromkeys(labels):
            points = sorted(
                (x, r[metric])
                for x, r, label in zip(axis.positions, rows, labels, strict=True)
                if label == series and r["status"] == COMPLETED and r[metric] is not None
            )
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "o-", label=series or None)
                plotted = True
        for status, marker, color in (
            (FAILED, "x", "red"),
            (INTERRUPTED, "s", "orange"),
            (DOES_NOT_FIT, "v", "orange"),
            (INCOMPLETE, "s", "grey"),
        ):
            marks = [x for x, r in zip(axis.positions, rows, strict=True) if r["status"] == status]
            if marks:
                ax.plot(
                    marks,
                    [0.04] * len(marks),
                    marker,
                    color=color,
                    markersize=10,
                    linestyle="none",
                    transform=ax.get_xaxis_transform(),
                    label=status,
                )
        if not plotted:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        if axis.log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        if 0 < len(axis.ticks) <= MAX_TICKS:
            ax.set_xticks(axis.ticks, axis.tick_labels)
        ax.margins(y=0.15)  # room below the points for the failed-job marks
        ax.set_title(titles[metric])
        ax.set_xlabel(axis.label)
        ax.grid(alpha=0.3)
        if i == 0 and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"sweep {sweep.sweep_dir.name}: {len(rows)} jobs, {len(sweep.failed)} failed")
    fig.savefig(path, dpi=100)
