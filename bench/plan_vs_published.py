"""``ftlab mode=plan device=gpu`` against published GPU figures, and the step-time model
against published and measured step times.

Run from the repository root (no GPU needed):

* ``python bench/plan_vs_published.py`` (seconds): every row of
  ``tests/fixtures/published_memory/rows.yaml``: the plan's figure of the published kind
  (per device), the published figure, their ratio and the row's band, then the rows ftlab
  cannot express and why (``tests/test_published_memory.py`` asserts the bands);
* ``--throughput`` (seconds): every row of ``tests/fixtures/published_throughput``: the
  MFU it implies under ``ftlab.planning.cost`` and the calibrated estimate / published;
* ``--cpu`` (minutes on two shared cores): trains the shipped model's dp2 LoRA run for
  ``--steps`` (two counts) and prints the CPU seconds per step of one process (children's
  user + system time, the difference between the two counts so start-up, loading and
  saving cancel; CPU time, not wall time, because the machine is shared) beside the cost
  model's estimate and the MFU that would make them agree.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_published_memory import compare, load_table  # noqa: E402
from test_published_throughput import (  # noqa: E402
    estimate,
    implied_mfu,
    load_rows,
    per_device_tokens,
)

# The run the CPU profile is calibrated with (what parallel=auto chose for the shipped
# model's LoRA run on this 2-core machine: dp2, micro-batch 8, no accumulation).
CPU_RUN = [
    "method=lora",
    "parallel=dp2",
    "device=cpu",
    "train.per_device_train_batch_size=8",
    "train.gradient_accumulation_steps=1",
]


def memory_table() -> None:
    table = load_table()
    print("| row | plan GiB | published GiB | plan / published | band | needed incl. eval GiB |")
    print("|---|---:|---:|---:|---|---:|")
    skipped = []
    for row in table["rows"]:
        if not row.get("expressible", True):
            skipped.append(row)
            continue
        c = compare(table, row)
        low, high = row["band"]
        flag = "" if low <= c.ratio <= high else " **out**"
        print(
            f"| {row['id']} | {c.plan_gib:.1f} | {c.published_gib:.1f} | {c.ratio:.2f}{flag} "
            f"| {low}-{high} | {c.eval_gib:.1f} |"
        )
    print("\nnot expressible:")
    for row in skipped:
        print(f"- {row['id']} ({row['figure_gib']} GiB): {row['reason']}")


def throughput_table() -> None:
    print("| row | published tokens/s/device | estimate | estimate / published | implied MFU |")
    print("|---|---:|---:|---:|---:|")
    for row in load_rows():
        est = per_device_tokens(estimate(row))
        published = row["tokens_per_device_s"]
        print(
            f"| {row['id']} | {published:,.0f} | {est:,.0f} | {est / published:.2f} "
            f"| {implied_mfu(row):.3f} |"
        )


def cpu_seconds(steps: int, out: Path) -> float:
    """Children's CPU seconds (user + system) of one ``ftlab`` training run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [str(REPO / ".venv" / "bin" / "ftlab"), *CPU_RUN, f"train.max_steps={steps}"]
    cmd.append(f"hydra.run.dir={out / f'steps_{steps}'}")
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_calibration(steps: tuple[int, int]) -> None:
    from conftest import compose_run

    from ftlab.config.environment import Environment
    from ftlab.planning.plan import layout_estimate

    with tempfile.TemporaryDirectory() as tmp:
        short, long = (cpu_seconds(n, Path(tmp)) for n in steps)
    processes = 2
    measured = (long - short) / (steps[1] - steps[0]) / processes
    run = compose_run(CPU_RUN)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    env = Environment("cpu", 2, "3.3.1", device_memory_gib=ram_gib)
    est = layout_estimate(run, env, None, [])[0]["estimate"]
    step, mfu = est["step"], est["hardware"]["mfu"]
    compute = step["compute"] + step["bubble"]
    comm = step["total"] - compute
    print(
        f"measured: {measured:.3f} CPU s per step per process ({steps} steps, {short:.1f} / "
        f"{long:.1f} CPU s in all)"
    )
    print(
        f"estimate: {step['total']:.3f} s (compute {compute:.3f}, communication {comm:.3f}) "
        f"at MFU {mfu:g}"
    )
    print(f"implied MFU: {mfu * compute / max(measured - comm, 1e-9):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--steps", type=int, nargs=2, default=(2, 12))
    args = ap.parse_args()
    if args.cpu:
        cpu_calibration(tuple(args.steps))
    elif args.throughput:
        throughput_table()
    else:
        memory_table()


if __name__ == "__main__":
    main()
