"""Every fine-tuning method through the real ``ftlab`` command, side by side.

Each variant is one ``ftlab method=... train.max_steps=N hydra.run.dir=...`` run on the
same model (stories260K), data (the demo stories), steps, batch and learning rate; the
table comes from each run's ``summary.json``: trainable parameters, median training
throughput, peak memory (resident set size on CPU, allocated device memory on GPU),
final dev loss, and the demo task's entity recall (base -> fine-tuned). Runs go one
after another (never in parallel: they would compete for the same cores). Not part of
the test suite.

    .venv/bin/python bench/methods.py                        # all variants, 60 steps
    .venv/bin/python bench/methods.py --steps 100 --only lora vera reft
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FTLAB = Path(sys.executable).parent / "ftlab"

# label -> overrides. One row each; LoRA variants are options of method=lora.
VARIANTS: dict[str, list[str]] = {
    "full": ["method=full"],
    "lora": ["method=lora"],
    "lora + rslora": ["method=lora", "method.rslora=true"],
    "lora + LoRA+ (x16)": ["method=lora", "method.lora_plus_scale=16"],
    "lora + pissa": ["method=lora", "method.pissa=true"],
    "lora + MoSLoRA": ["method=lora", "method.lora_use_mixer=true"],
    "lora + MoRA": ["method=lora", "method.use_mora=true"],
    "lora + NEFTune (5)": ["method=lora", "method.neftune_noise_alpha=5"],
    "prefix": ["method=prefix"],
    "vera": ["method=vera"],
    "lokr": ["method=lokr"],
    "reft": ["method=reft"],
}


def run_variant(label: str, overrides: list[str], out_dir: Path, common: list[str]) -> dict:
    run_dir = out_dir / re.sub(r"[^a-z0-9]+", "_", label.lower().replace("+", "plus")).strip("_")
    cmd = [str(FTLAB), *overrides, *common, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    (out_dir / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"label": label, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"label": label, "summary": summary, "wall": wall}


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = [
        "| method | trainable params | tokens/s | peak mem (MiB) | final eval loss "
        "| entity recall (base -> tuned) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error']} | | | | |")
            continue
        s = row["summary"]
        p = s["parameters"]
        share = 100.0 * p["trainable"] / p["total"]
        lines.append(
            f"| {row['label']} | {p['trainable']:,} ({share:.2f}%) "
            f"| {fmt(s['tokens_per_second'], ',.0f')} | {fmt(s['peak_memory_mb'], ',.0f')} "
            f"| {fmt(s['eval_loss'], '.4f')} "
            f"| {fmt(s['entity_recall_base'], '.3f')} -> {fmt(s['entity_recall'], '.3f')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--only", nargs="*", help="labels (or method names) to run")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_methods")
    args = p.parse_args(argv)
    chosen = {
        k: v
        for k, v in VARIANTS.items()
        if not args.only or k in args.only or v[0].split("=")[1] in args.only
    }
    out_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    common = [
        f"train.max_steps={args.steps}",
        f"train.learning_rate={args.lr}",
        "train.logging_steps=10",
    ]
    rows = []
    for label, overrides in chosen.items():
        print(f"running {label} ...", file=sys.stderr, flush=True)
        rows.append(run_variant(label, overrides, out_dir, common))
    print(
        f"\nstories260K, demo_stories, {args.steps} steps x batch 16, lr {args.lr}, "
        f"cosine, fp32; runs in {out_dir}\n"
    )
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
