"""The pairwise matrix of whole runs (issue 31): features meeting other groups' defaults.

Every pair of values over the axes below appears in at least one run (a covering array of
strength 2, built by ``covering_array``: a small deterministic greedy, AETG-style: each
uncovered pair seeds a candidate row that takes, axis by axis, the value covering the most
uncovered pairs (ties to the value listed first, so cheap values such as ``single`` win);
the candidate covering most is kept). Settings CPU cannot run at all (half precision), and
SFT data given to a preference stage (or the reverse), are not crossed with everything:
each is one extra row that must be refused in one line.

Each run is the real ``ftlab`` on the shipped model with two steps and tiny eval settings,
bounded in time, and must end ``completed`` (status.json) or refused in one
``ftlab: error:`` line; a traceback, a hang or anything else fails.

    python tests/matrix.py [--out DIR] [--only N]      # or: make test-matrix
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FTLAB = Path(sys.executable).with_name("ftlab")
TIMEOUT = 420  # seconds a run may take (dp2 runs start two processes on two shared cores)

AXES: dict[str, tuple[str, ...]] = {
    "data": ("src_tgt", "alpaca", "chat", "text", "mixture", "preference"),
    "packing": ("none", "zero_padding", "greedy"),
    "attention": ("eager", "flash", "flashmask"),
    "method": ("lora", "full", "qlora", "vera", "lokr", "prefix", "reft"),
    "stage": ("sft", "dpo", "kto"),
    "layout": ("single", "dp2"),
    "generation": ("off", "on"),
}
# CPU computes in float32 only: each half type is one row, refused in one line. The same
# for SFT data given to a preference stage and the reverse (one row each, not crossed).
ISOLATED = [
    {"precision": "bf16"},
    {"precision": "fp16"},
    {**dict.fromkeys(AXES, ""), "data": "src_tgt", "stage": "dpo"},
    {**dict.fromkeys(AXES, ""), "data": "preference", "stage": "sft"},
]
PREFERENCE_STAGES = ("dpo", "kto")


def valid(row: dict[str, str]) -> bool:
    """A preference stage trains on preference data and SFT on SFT data (the rest is
    crossed freely: what cannot work must be refused in one line)."""
    if "data" not in row or "stage" not in row:
        return True
    return (row["data"] == "preference") == (row["stage"] in PREFERENCE_STAGES)


TINY = [
    "train.max_steps=2",
    "train.logging_steps=1",
    "train.per_device_train_batch_size=2",
    "train.gradient_accumulation_steps=1",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "data.max_length=128",
    "data.src_length=48",
]


def covering_array(axes: dict[str, tuple[str, ...]]) -> list[dict[str, str]]:
    """Rows in which every valid pair of values of two axes occurs at least once (greedy)."""
    names = list(axes)

    def pair(a: str, va: str, b: str, vb: str) -> tuple:
        return ((a, va), (b, vb)) if names.index(a) < names.index(b) else ((b, vb), (a, va))

    uncovered = {
        pair(a, va, b, vb)
        for a, b in combinations(names, 2)
        for va in axes[a]
        for vb in axes[b]
        if valid({a: va, b: vb})
    }

    def rank(p: tuple) -> tuple:
        (a, va), (b, vb) = p
        return names.index(a), names.index(b), axes[a].index(va), axes[b].index(vb)

    def complete(seed: tuple) -> dict[str, str]:
        (a, va), (b, vb) = seed
        row = {a: va, b: vb}
        for axis in names:
            if axis in row:
                continue
            options = [v for v in axes[axis] if valid({**row, axis: v})]
            row[axis] = max(
                options,
                key=lambda v: (
                    sum(pair(x, row[x], axis, v) in uncovered for x in row),
                    -axes[axis].index(v),
                ),
            )
        return {axis: row[axis] for axis in names}

    def covers(row: dict[str, str]) -> set:
        return {pair(x, row[x], y, row[y]) for x, y in combinations(names, 2)} & uncovered

    rows = []
    while uncovered:
        # Every uncovered pair seeds a candidate; the row covering most is kept (ties:
        # the first seed in a fixed order), so the result is the same on every machine.
        candidates = (complete(seed) for seed in sorted(uncovered, key=rank))
        row = max(candidates, key=lambda r: len(covers(r)))
        rows.append(row)
        uncovered -= covers(row)
    return rows


def chat_data(work: Path) -> Path:
    """The demo stories as chat records (``messages``), a few of them."""
    from ftlab.assets import asset_path

    out = work / "chat"
    if out.is_dir():
        return out
    out.mkdir(parents=True)
    for name, n in (("train.json", 64), ("dev.json", 8)):
        rows = []
        for line in (asset_path("demo_stories") / name).read_text().splitlines()[:n]:
            r = json.loads(line)
            turns = [
                {"role": "user", "content": r["src"]},
                {"role": "assistant", "content": r["tgt"]},
            ]
            rows.append(json.dumps({"messages": turns}))
        (out / name).write_text("\n".join(rows) + "\n")
    return out


def overrides(row: dict[str, str], work: Path) -> list[str]:
    """The ftlab command line of one row."""
    data = {
        "src_tgt": ["data=demo_stories"],
        "alpaca": ["data=alpaca", f"data.path={REPO / 'tests/fixtures/alpaca_seed'}"],
        "chat": ["data=demo_stories", f"data.path={chat_data(work)}", "data.format=messages"],
        "text": ["data=demo_text"],
        "mixture": ["data=mixture"],
        "preference": ["data=demo_preferences"],
    }
    attention = {
        "eager": [],
        "flash": ["model.flash_attention=true"],
        "flashmask": ["model.flash_attention=true", "model.flash_mask=true"],
    }
    out = []
    if "precision" in row:
        return ["data=demo_stories", f"precision={row['precision']}"]
    if not row["method"]:  # an isolated data/stage mismatch: everything else at its default
        return [f"stage={row['stage']}", *data[row["data"]]]
    out += [f"stage={row['stage']}"] if row["stage"] != "sft" else []
    out += data[row["data"]]
    out += [f"data.packing={row['packing']}"]
    out += attention[row["attention"]]
    out += [f"method={row['method']}", f"parallel={row['layout']}"]
    out += [f"eval.generation={'true' if row['generation'] == 'on' else 'false'}"]
    return out


@dataclass
class Outcome:
    row: dict[str, str]
    command: list[str]
    result: str  # completed | refused | FAILED: ...
    seconds: float
    line: str = ""


def run_row(row: dict[str, str], work: Path, index: int) -> Outcome:
    run_dir = work / f"run{index:02d}"
    command = [*overrides(row, work), *TINY, f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(FTLAB), *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return Outcome(row, command, f"FAILED: no end within {TIMEOUT} s", TIMEOUT)
    seconds = round(time.monotonic() - started, 1)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ftlab: error:")]
    if "Traceback" in proc.stderr:
        return Outcome(row, command, "FAILED: traceback", seconds, proc.stderr[-1500:])
    if proc.returncode == 0:
        status = json.loads((run_dir / "status.json").read_text()).get("status")
        result = "completed" if status == "completed" else f"FAILED: status {status}"
        return Outcome(row, command, result, seconds)
    if proc.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0]:
        return Outcome(row, command, "refused", seconds, errors[0])
    return Outcome(row, command, f"FAILED: exit {proc.returncode}", seconds, proc.stderr[-1500:])


def all_rows() -> list[dict[str, str]]:
    return covering_array(AXES) + ISOLATED


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "matrix")
    p.add_argument("--only", type=int, nargs="*", help="row numbers to run (default: all)")
    args = p.parse_args(argv)
    rows = all_rows()
    args.out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    started = time.monotonic()
    for i, row in enumerate(rows):
        if args.only and i not in args.only:
            continue
        o = run_row(row, args.out, i)
        outcomes.append(o)
        print(f"{i:2d} {o.result:10s} {o.seconds:6.1f}s {' '.join(o.command[: -len(TINY) - 1])}")
        if o.result.startswith("FAILED") or o.result == "refused":
            print(f"   {o.line.strip()[-600:]}")
        sys.stdout.flush()
    total = round(time.monotonic() - started, 1)
    counts = {}
    for o in outcomes:
        key = "failed" if o.result.startswith("FAILED") else o.result
        counts[key] = counts.get(key, 0) + 1
    record = {
        "rows": len(outcomes),
        "seconds": total,
        "counts": counts,
        "outcomes": [o.__dict__ for o in outcomes],
    }
    (args.out / "matrix.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"matrix: {len(outcomes)} runs in {total:.0f} s: {counts}")
    return 1 if counts.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
