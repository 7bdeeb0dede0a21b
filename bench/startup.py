"""How long ``ftlab --help``, ``ftlab mode=plan`` and the default run take, split by phase.

Run from the repository root: ``python bench/startup.py`` (``make bench-startup``; about
2 minutes on two quiet cores with the default 3 repeats). Not part of the tests.

Each command runs in a fresh process through ``main()``, the function the ``ftlab``
console script calls, wrapped so that the process reports the phase marks ftlab itself
takes (``ftlab.record.phases``, the same split the run logs to ``train.log``):

* ``import``: interpreter start to ``main()`` (the CLI's imports);
* ``compose``: Hydra composition, validation, the machine probe, the run dir;
* ``data``, ``model load``, ``base eval``, ``trainer setup``, ``train``, ``tuned eval``
  (eval loss and the fine-tuned generations), ``save`` (``final/``, samples, summary): the
  default run's stages (``ftlab.training.run``);
* ``rest``: from the last mark to the end of the process (``--help`` and the plan itself,
  the summary table, interpreter shutdown).

Wall time is measured from just before the process is started to its exit; CPU time is the
process's own (every thread: ``time.process_time`` at each mark, the child's rusage for the
whole process), which a busy machine inflates far less than wall time. Each figure is the
median of ``--repeats`` runs (so the phases need not add up to the total exactly). The
table also says whether Paddle was imported (``--help`` and ``mode=plan`` on a CPU build
should not need it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# main() with the phase marks dumped at exit (SystemExit included: --help exits 0).
WRAPPER = """
import json, sys, time
start_wall, start_cpu = float(sys.argv[1]), time.process_time()
out = sys.argv[2]
sys.argv = ["ftlab", *sys.argv[3:]]
from ftlab.record import phases
phases.MARKS.append(phases.Mark("start", start_wall, 0.0))
try:
    from ftlab.cli.app import main
    main()
except SystemExit as err:
    code = err.code
else:
    code = 0
end = phases.mark("rest")
heavy = sorted(m for m in ("paddle", "paddlenlp") if m in sys.modules)
with open(out, "w") as f:
    json.dump({"marks": [[m.name, m.wall, m.cpu] for m in phases.MARKS], "code": code,
               "heavy": heavy}, f)
# End as the console script does (ftlab/cli/process_exit.py), so "total" includes its exit.
from ftlab.cli.process_exit import finish
finish(0 if code is None else code if isinstance(code, int) else 1)
"""
COMMANDS = {
    "ftlab --help": ["--help"],
    "ftlab mode=plan": ["mode=plan"],
    "ftlab (default run)": [],
}
ORDER = [
    "import",
    "compose",
    "data",
    "model load",
    "base eval",
    "trainer setup",
    "train",
    "tuned eval",
    "save",
    "rest",
]


def run_once(args: list[str], workdir: Path) -> dict:
    """One fresh process; its phases ``{name: (wall, cpu)}``, total, and heavy imports."""
    from ftlab.record.phases import Mark, durations

    record = workdir / "marks.json"
    run_dir = workdir / f"run-{time.time_ns()}"
    overrides = [] if args == ["--help"] else [f"hydra.run.dir={run_dir}"]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, repr(started), str(record), *args, *overrides],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=False,
    )
    ended = time.time()
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    process_cpu = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)
    if proc.returncode != 0 or not record.exists():
        raise SystemExit(f"ftlab {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    data = json.loads(record.read_text())
    record.unlink()
    if data["code"] not in (0, None):
        raise SystemExit(f"ftlab {' '.join(args)} exited {data['code']}:\n{proc.stderr}")
    marks = [Mark(*m) for m in data["marks"]]
    phases = durations(marks)
    # "rest" runs to the process's end: interpreter shutdown is in the child's rusage.
    wall, cpu = phases.get("rest", (0.0, 0.0))
    phases["rest"] = (wall + ended - marks[-1].wall, cpu + process_cpu - marks[-1].cpu)
    return {"phases": phases, "total": (ended - started, process_cpu), "heavy": data["heavy"]}


def median_table(runs: list[dict]) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    names = [n for n in ORDER if any(n in r["phases"] for r in runs)]
    table = {}
    for name in names:
        walls = [r["phases"].get(name, (0.0, 0.0))[0] for r in runs]
        cpus = [r["phases"].get(name, (0.0, 0.0))[1] for r in runs]
        table[name] = (statistics.median(walls), statistics.median(cpus))
    total = (
        statistics.median(r["total"][0] for r in runs),
        statistics.median(r["total"][1] for r in runs),
    )
    return table, total


def load_average() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per command (median)")
    parser.add_argument(
        "--only", choices=sorted(COMMANDS), action="append", help="time only these commands"
    )
    opts = parser.parse_args(argv)
    chosen = opts.only or list(COMMANDS)
    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="ftlab-bench-startup-") as tmp:
        for label in chosen:
            runs = [run_once(COMMANDS[label], Path(tmp)) for _ in range(opts.repeats)]
            table, (wall, cpu) = median_table(runs)
            heavy = sorted({m for r in runs for m in r["heavy"]}) or ["none"]
            print(f"\n{label}: median of {opts.repeats}; imported: {', '.join(heavy)}")
            print(f"  {'phase':<14} {'wall s':>8} {'CPU s':>8}")
            for name, (w, c) in table.items():
                print(f"  {name:<14} {w:8.2f} {c:8.2f}")
            print(f"  {'total':<14} {wall:8.2f} {cpu:8.2f}")
    print(f"\nload average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
