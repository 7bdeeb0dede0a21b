"""Multi-process runs: ``ftlab`` starts Paddle's launcher itself.

When the layout needs more than one process, the ``ftlab`` process becomes the launcher:
it runs Paddle's ``paddle.distributed.launch`` (through ``ftlab.distributed.paddle_launch``,
see below) with one worker per device (GPUs from ``CUDA_VISIBLE_DEVICES``; on CPU, gloo
processes), and every worker re-enters ``ftlab.cli.app`` with the user's original
overrides plus ``hydra.run.dir=<this run dir>`` (quoted: a sweep's job dir holds ``=`` and
``,``), so one job writes one experiment directory. Only the launcher writes ``.hydra/``
(``hydra.output_subdir=null`` for workers); only rank 0 writes the run's files; each
worker's output lands in ``<run dir>/logs/workerlog.<rank>``.

The job goes down as one: Paddle's launcher runs in its own session, and ``ftlab`` stops
it (SIGTERM, then SIGKILL) on any signal or error; Paddle's launcher asks the kernel for
SIGTERM when ``ftlab`` dies (``PR_SET_PDEATHSIG``), and every worker for SIGKILL when
Paddle's launcher dies, so even ``kill -9`` of ``ftlab`` leaves no worker training on.

Paddle's launcher would dump every worker's whole environment (``envlog.*``,
``backup_env.*.json``, the pod log) into the run dir; environments hold tokens and
passwords, and a SIGKILL leaves no chance to delete them, so ``paddle_launch`` keeps
them from being written at all.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ftlab import CONSOLE, signals
from ftlab.config.derived import Derived
from ftlab.config.overrides import override
from ftlab.config.schema import RunConfig
from ftlab.distributed.slurm import slurm_master
from ftlab.errors import ConfigError, FtlabError
from ftlab.record.rundir import SUMMARY, RunDir
from ftlab.record.summary import Summary

log = logging.getLogger(__name__)
rank0_console = logging.getLogger(f"{CONSOLE}.rank0")  # rank 0's console lines, echoed

JOB_ID = "ftlab"
# Files Paddle's launcher would write into its log directory, holding a copy of the
# process environment (``paddle_launch`` prevents them; ``remove_env_dumps`` is the
# second line of defence for a Paddle that writes them some other way).
ENV_DUMPS = ("envlog.*", "backup_env.*.json", f"{JOB_ID}.*.log")
LOG_TAIL_LINES = 40
# The pid a process must die with: Paddle's launcher reads the ftlab process's, the
# workers read Paddle's launcher's.
PARENT_PID_ENV = "FTLAB_PARENT_PID"
# How long Paddle's launcher gets to stop its workers before ftlab kills it.
STOP_GRACE_SECONDS = 30
PR_SET_PDEATHSIG = 1
# Lines of Paddle's launcher process itself, not of a worker (workers format their
# warnings): its "LAUNCH INFO ..." lines and the raw Python warnings of its imports.
LAUNCHER_LINE = re.compile(
    r"^(LAUNCH (INFO|DEBUG)\b|\S+\.py:\d+: \w*Warning: |\s+warnings\.warn\()"
)


class LaunchError(FtlabError):
    """A worker of a multi-process run failed; the message carries its log tail."""


def inside_worker() -> bool:
    """True in a process started by Paddle's launcher (it sets PADDLE_TRAINERS_NUM)."""
    return "PADDLE_TRAINERS_NUM" in os.environ


def die_with_parent(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent (``PARENT_PID_ENV``) exits.

    Linux ``prctl(PR_SET_PDEATHSIG)``; a parent that is already gone (it died between
    starting this process and this call) gets the same answer at once.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(expected):
        os.kill(os.getpid(), sig)


def die_with_launcher() -> None:
    """In a worker: SIGKILL when Paddle's launcher exits (nothing to save for an orphan;
    checkpoints are staged, so a kill mid-save leaves nothing a resume would use)."""
    if inside_worker():
        die_with_parent(signal.SIGKILL)


def needs_launch(derived: Derived) -> bool:
    """More than one process is needed and this process is not already one of them."""
    return derived.world_size > 1 and not inside_worker()


def original_overrides() -> list[str]:
    """The command-line overrides of this job (``key=value``), as the user typed them.

    Hydra keeps them in ``HydraConfig.overrides.task``; in a sweep they are the job's own
    overrides. Hydra's own settings (``hydra.*``) are not part of them.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise ConfigError(
            "a multi-process layout was requested outside the ftlab command (no Hydra "
            "context to read the overrides from). Run it through `ftlab ...`, or call "
            "launch_command() with the overrides yourself."
        )
    return list(HydraConfig.get().overrides.task)


def gpu_devices(nproc: int) -> list[str]:
    """The first ``nproc`` GPU ids this process may use (``CUDA_VISIBLE_DEVICES`` order)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() in ("", "all"):
        import paddle

        ids = [str(i) for i in range(paddle.device.cuda.device_count())]
    else:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
    if len(ids) < nproc:
        raise ConfigError(
            f"{nproc} worker processes need {nproc} GPUs, but CUDA_VISIBLE_DEVICES "
            f"({visible!r}) offers {len(ids)}. Make more GPUs visible or use a smaller layout."
        )
    return ids[:nproc]


def check_launch(run: RunConfig) -> None:
    """Multi-node settings that cannot form a job."""
    lc = run.launch
    if lc.nnodes < 1:
        raise ConfigError(f"launch.nnodes={lc.nnodes}: needs at least 1 node.")
    if lc.nnodes > 1 and not (lc.master or lc.ips):
        raise ConfigError(
            f"launch.nnodes={lc.nnodes}: the nodes need a rendezvous point. Set "
            "launch.master=HOST:PORT (same value on every node) or launch.ips=IP1,IP2,... "
            "(see launch/multinode.sh)."
        )
    if lc.ips is not None and len(lc.ips.split(",")) != lc.nnodes:
        raise ConfigError(
            f"launch.ips={lc.ips!r} names {len(lc.ips.split(','))} nodes but "
            f"launch.nnodes={lc.nnodes}. Give one IP per node."
        )
    if lc.master is not None and not re.fullmatch(r"[\w.\-]+:\d+", lc.master):
        raise ConfigError(f"launch.master={lc.master!r} must be HOST:PORT, e.g. 10.0.0.1:8090.")


def launch_command(
    run: RunConfig,
    derived: Derived,
    run_dir: Path,
    overrides: list[str],
    devices: list[str] | None = None,
) -> list[str]:
    """The command line that starts this run's workers through Paddle's launcher.

    ``devices`` is the GPU list (None on CPU: Paddle's launcher then starts gloo
    processes; ``--devices`` would fail there).
    """
    lc = run.launch
    cmd = [
        sys.executable,
        "-m",
        "ftlab.distributed.paddle_launch",
        "--nproc_per_node",
        str(derived.nproc_per_node),
        "--log_dir",
        str(launcher_log_dir(run, RunDir(run_dir))),
        "--job_id",
        JOB_ID,
    ]
    if devices:
        cmd += ["--devices", ",".join(devices)]
    if lc.nnodes > 1:
        cmd += ["--nnodes", str(lc.nnodes)]
    if lc.master:
        cmd += ["--master", lc.master]
    if lc.ips:
        cmd += ["--ips", lc.ips]
    # Paddle's launcher takes anything but a *.py path as the executable, so the worker
    # is `python -u -m ftlab.cli.app ...` (it treats a bare `-m` as a legacy option).
    cmd += [sys.executable, "-u", "-m", "ftlab.cli.app", *worker_overrides(overrides, run_dir)]
    return cmd


def worker_overrides(overrides: list[str], run_dir: Path) -> list[str]:
    """User overrides + the fixed run dir; workers write no ``.hydra/`` and log to stdout."""
    own = [o for o in overrides if not o.lstrip("+~").startswith("hydra.run.dir=")]
    return [
        *own,
        # Quoted: a sweep job's dir name holds '=' and ',' (its overrides), which Hydra's
        # override grammar would otherwise parse.
        override("hydra.run.dir", str(run_dir)),
        "hydra.output_subdir=null",
        # Worker stdout (its console lines) is captured in logs/workerlog.<rank>; its
        # complete log goes to logs/train.<rank>.log (ftlab.cli.console).
        "hydra/job_logging=ftlab_worker",
    ]


def remove_env_dumps(log_dir: Path) -> list[str]:
    """Delete the launcher's environment dumps; return the names removed."""
    removed = []
    for pattern in ENV_DUMPS:
        for f in sorted(log_dir.glob(pattern)):
            f.unlink(missing_ok=True)
            removed.append(f.name)
    return removed


FAILED_RANK = re.compile(r"rank\s+(\d+)\s+status\s+failed.*?code\s+(-?\d+)", re.I)


def failed_ranks(launcher_output: str, log_dir: Path) -> list[tuple[int, int | None]]:
    """(rank, exit code) of the failed workers: from the launcher's report, else the logs.

    Paddle's launcher reports ``Container rank N status failed ... code C``; when that
    line is missing (the launcher itself was killed), the ranks whose log holds a
    traceback are named, with an unknown exit code.
    """
    found = {int(r): int(c) for r, c in FAILED_RANK.findall(launcher_output)}
    if found:
        return sorted(found.items())
    out: list[tuple[int, int | None]] = []
    for f in sorted(log_dir.glob("workerlog.*")):
        suffix = f.name.rsplit(".", 1)[-1]
        if suffix.isdigit() and "Traceback" in f.read_text(errors="replace"):
            out.append((int(suffix), None))
    return out


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines)).rstrip()


def failure_message(run: RunConfig, code: int, launcher_output: str, log_dir: Path) -> str:
    ranks = failed_ranks(launcher_output, log_dir)
    head = (
        f"parallel={run.parallel.name}: the distributed job failed (paddle.distributed."
        f"launch exited with {code})."
    )
    if not ranks:
        tail = "\n".join(launcher_output.rstrip().splitlines()[-LOG_TAIL_LINES:])
        return (
            f"{head} No worker reported a failure; the launcher's last lines:\n{tail}\n"
            f"Worker logs: {log_dir}/workerlog.<rank>."
        )
    rank, rc = ranks[0]
    others = ", ".join(str(r) for r, _ in ranks[1:])
    path = log_dir / f"workerlog.{rank}"
    return (
        f"{head} Rank {rank} failed (exit {rc if rc is not None else 'unknown'})"
        f"{f'; ranks {others} failed too' if others else ''}. Last lines of {path}:\n"
        f"{log_tail(path)}"
    )


def launcher_log_dir(run: RunConfig, run_dir: RunDir) -> Path:
    """Where this node's workers' logs go: ``logs/``, or with several nodes sharing the run
    dir ``logs/node-<host>-<pid>/`` (Paddle names them ``workerlog.<local rank>``, so the
    nodes' files would collide; the launcher's pid tells two nodes on one host apart)."""
    if run.launch.nnodes <= 1:
        return run_dir.logs
    return run_dir.logs / f"node-{socket.gethostname()}-{os.getpid()}"


def run_launcher(cmd: list[str], log_dir: Path) -> tuple[int, str]:
    """Run Paddle's launcher, echoing its output; return (exit code, output tail).

    It runs in a session of its own and is told which pid to die with. On any exception
    here (a signal turned into ``Interrupted``, an error) it is stopped: SIGTERM, with
    which it stops its workers, then SIGKILL after ``STOP_GRACE_SECONDS`` (or at a second
    signal); its workers die with it.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        errors="replace",
        start_new_session=True,
        env={**os.environ, PARENT_PID_ENV: str(os.getpid())},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            # Paddle's launcher echoes rank 0's log, which holds its console lines: they are
            # this job's console; the launcher's own lines go to train.log only.
            launcher_line = LAUNCHER_LINE.match(line)
            (log.info if launcher_line else rank0_console.info)(line.rstrip("\n"))
            tail.append(line)
        code = proc.wait()
    except BaseException:
        stop_launcher(proc)
        raise
    finally:
        remove_env_dumps(log_dir)
    return code, "".join(tail)


def stop_launcher(proc: subprocess.Popen) -> None:
    """SIGTERM Paddle's launcher (it stops its workers), SIGKILL its group if it lingers.

    Its output is still read meanwhile: a launcher blocked on a full pipe cannot stop.
    """
    try:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=STOP_GRACE_SECONDS)
        sys.stdout.write(rest or "")
    except BaseException:  # noqa: BLE001 - timed out, or a second signal: no more waiting
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def launch_workers(run: RunConfig, derived: Derived, run_dir: RunDir) -> Summary | None:
    """Start the workers, wait for them, and return rank 0's summary (None when rank 0 ran
    on another node)."""
    run = slurm_master(run)  # launch.master=slurm: the first node of this SLURM job
    check_launch(run)
    devices = gpu_devices(derived.nproc_per_node) if derived.device == "gpu" else None
    cmd = launch_command(run, derived, run_dir.path, original_overrides(), devices)
    log_dir = launcher_log_dir(run, run_dir)
    log.info(
        "launching %d worker(s) per node x %d node(s) (%s): %s",
        derived.nproc_per_node,
        run.launch.nnodes,
        "GPUs " + ",".join(devices) if devices else "CPU gloo",
        " ".join(cmd),
    )
    signals.install()  # Paddle's import replaced the SIGTERM handler (ftlab.signals)
    code, output = run_launcher(cmd, log_dir)
    if code != 0:
        raise LaunchError(failure_message(run, code, output, log_dir))
    if not run_dir.exists(SUMMARY):
        if run.launch.nnodes > 1:
            log.info("rank 0 ran on another node; its summary.json is in its run dir")
            return None
        raise LaunchError(
            f"parallel={run.parallel.name}: the workers exited 0 but rank 0 wrote no "
            f"{run_dir / SUMMARY}. See {log_dir}/workerlog.0."
        )
    # Rank 0 printed its summary into logs/workerlog.0, which the launcher echoes.
    return Summary.from_dict(run_dir.read_json(SUMMARY))
