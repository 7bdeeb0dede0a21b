"""The CPU fast path before and after: the same work with Paddle's CPU defaults and with ftlab's.

``before``: MKL's vendor-chosen kernels and one math thread (Paddle's defaults);
``after``: ``MKL_DEBUG_CPU_TYPE=5`` where ftlab sets it (AMD CPU with AVX2) and the cores
divided among the processes (``ftlab/config/cpu_runtime.py``). Workloads, each a whole
process, before and after alternating, median of ``--repeats``:

  default run   ``ftlab`` with no overrides (its ``launch.cpu_fast_path`` /
                ``launch.cpu_threads`` settings give before and after); its train seconds
                come from ``summary.json``
  long step     one 2048-token FlashMask training step of the 23.6M Llama
                (``bench/long_sequence.py``'s step, its first step timed)
  qlora step    ``bench/qlora_memory.py``'s nf4 QLoRA step on its ~100M Llama (median of
                its timed steps)

The benchmark scripts are not ftlab runs, so before/after is their environment:
``MKL_DEBUG_CPU_TYPE`` and ``OMP_NUM_THREADS`` (which Paddle keeps when set) as ftlab
would choose them, and ``FTLAB_BENCH_CPU_LAYERS`` (``ftlab`` / ``paddlenlp``), which makes
the scripts take ftlab's CPU layouts of attention, RMSNorm and rotary or PaddleNLP's. CPU
seconds come from ``wait4`` (user + system of the process).

    .venv/bin/python bench/cpu_fast_path.py --repeats 3
    .venv/bin/python bench/cpu_fast_path.py --only default --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ftlab.config.cpu_runtime import (  # noqa: E402
    MKL_VAR,
    SET_BY_FTLAB_VAR,
    available_cores,
    choose_mkl_path,
    read_cpu_info,
)

FTLAB = Path(sys.executable).parent / "ftlab"
WORKLOADS = ("default", "long", "qlora")
LAYERS_VAR = "FTLAB_BENCH_CPU_LAYERS"


def bench_cpu_layers(model: object) -> None:
    """In a benchmark script: the model gets what ftlab's loader gives every model
    (``finish_model``) when ``FTLAB_BENCH_CPU_LAYERS`` is set, with ftlab's CPU layers on
    (``ftlab``) or off (``paddlenlp``); unset, the script's own model is left as it is."""
    choice = os.environ.get(LAYERS_VAR)
    if choice is None:
        return
    from ftlab.models.cpu_layers import use_fast_cpu_layers
    from ftlab.models.loading import finish_model

    finish_model(model)
    use_fast_cpu_layers(choice == "ftlab")


def environment(fast: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (MKL_VAR, SET_BY_FTLAB_VAR)}
    env["PYTHONWARNINGS"] = "ignore"
    env[LAYERS_VAR] = "ftlab" if fast else "paddlenlp"
    if fast:
        choose_mkl_path(True, env, read_cpu_info())
        env["OMP_NUM_THREADS"] = str(available_cores())
    else:
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Like ``run`` but reaps the child itself so its rusage is its own."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    return usage.ru_utime + usage.ru_stime, wall, out.decode(errors="replace")


def default_run(fast: bool, work: Path) -> dict[str, float]:
    run_dir = work / f"default-{time.monotonic_ns()}"
    settings = [] if fast else ["launch.cpu_fast_path=false", "launch.cpu_threads=1"]
    cmd = [str(FTLAB), *settings, f"hydra.run.dir={run_dir}"]
    cpu, wall, _ = run_measured(cmd, environment(False))  # ftlab decides by its settings
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"cpu": cpu, "wall": wall, "step": summary["train_seconds"]}


def long_step(fast: bool, work: Path) -> dict[str, float]:
    cmd = [sys.executable, str(REPO / "bench/long_sequence.py"), "--part", "step"]
    cmd += ["--impl", "flash_flashmask", "--length", "2048", "--steps", "0"]
    cpu, wall, out = run_measured(cmd, environment(fast))
    result = json.loads(out.strip().splitlines()[-1])
    return {"cpu": cpu, "wall": wall, "step": result["step_s"]}


def qlora_step(fast: bool, work: Path) -> dict[str, float]:
    cmd = [sys.executable, str(REPO / "bench/qlora_memory.py"), "--worker", "qlora-nf4"]
    cmd += ["--steps", "2"]
    cpu, wall, out = run_measured(cmd, environment(fast))
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1]
    return {"cpu": cpu, "wall": wall, "step": json.loads(line[len("RESULT ") :])["step_s"]}


RUNNERS = {"default": default_run, "long": long_step, "qlora": qlora_step}
LABELS = {
    "default": "default run (train s)",
    "long": "2048-token FlashMask step",
    "qlora": "bench-qlora nf4 step",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"cpu: {read_cpu_info().vendor}, {available_cores()} cores; load {os.getloadavg()[0]:.2f}"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="ftlab-fastpath-") as tmp:
        for name in args.only:
            results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
            for i in range(args.repeats):
                for fast in (False, True):
                    results[fast].append(RUNNERS[name](fast, Path(tmp)))
                    print(f"  {name} round {i + 1} fast={fast}: {results[fast][-1]}", flush=True)
            med = {
                fast: {k: statistics.median(r[k] for r in rs) for k in ("cpu", "wall", "step")}
                for fast, rs in results.items()
            }
            before, after = med[False], med[True]
            rows.append(
                f"| {LABELS[name]} | {before['step']:.2f} -> {after['step']:.2f} "
                f"({before['step'] / after['step']:.2f}x) | {before['cpu']:.1f} -> "
                f"{after['cpu']:.1f} ({before['cpu'] / after['cpu']:.2f}x) | "
                f"{before['wall']:.1f} -> {after['wall']:.1f} |"
            )
    print(f"\nmedians of {args.repeats}, before/after alternating; load {os.getloadavg()[0]:.2f}")
    print("| workload | step s before -> after | process CPU s | process wall s |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
