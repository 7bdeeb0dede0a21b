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

A node that fails takes the job down: gloo ends the surviving workers' collectives once
their peer's sockets close, and each node's launcher names the job's rank that failed
first (``ftlab.distributed.failures``; measured here: both launchers exit within 6 s of a
SIGKILL of one node's worker).

Paddle's launcher would dump every worker's whole environment (``envlog.*``,
``backup_env.*.json``, the pod log) into the run dir; environments hold tokens and
passwords, and a SIGKILL leaves no chance to delete them, so ``paddle_launch`` keeps
them from being written at all.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ftlab import CONSOLE, signals
from ftlab.config.derived import Derived
from ftlab.config.overrides import override
from ftlab.config.schema import RunConfig
from ftlab.distributed.failures import WORKER_RECORD, LaunchError, analyse_failure
from ftlab.distributed.slurm import slurm_master
from ftlab.errors import ConfigError
from ftlab.record.rundir import SUMMARY, RunDir, write_json_atomic
from ftlab.record.summary import Summary

log = logging.getLogger(__name__)
rank0_console = logging.getLogger(f"{CONSOLE}.rank0")  # rank 0's console lines, echoed

JOB_ID = "ftlab"
# Files Paddle's launcher would write into its log directory, holding a copy of the
# process environment (``paddle_launch`` prevents them; ``remove_env_dumps`` is the
# second line of defence for a Paddle that writes them some other way).
ENV_DUMPS = ("envlog.*", "backup_env.*.json", f"{JOB_ID}.*.log")
# The pid a process must die with: Paddle's launcher reads the ftlab process's, the
# workers read Paddle's launcher's.
PARENT_PID_ENV = "FTLAB_PARENT_PID"
# How long Paddle's launcher gets to stop its workers before ftlab kills it.
STOP_GRACE_SECONDS = 30
PR_SET_PDEATHSIG = 1
# Lines of Paddle's launcher process itself, not of a worker (workers format their
# warnings): its "LAUNCH INFO ..." lines and the raw Python warnings of its imports.
LAUNCHER_LINE = re.compile(
    r"^(LAUNCH (INFO|DEBUG)\b|\S+\.py:\d+: \w*Warning: |\s+warnings\.warn\("
    # its master's HTTP requests (httpx logs each one), and paddle_launch's timeout line
    r"|\[[\d\-: ,]+\] \[\s*INFO\] _client\.py:\d+ - HTTP Request: |ftlab rendezvous timeout: )"
)


# paddle_launch ends with this code and a line starting with the marker when the nodes
# did not all join within launch.rendezvous_timeout (EX_TEMPFAIL: nothing ran yet).
RENDEZVOUS_EXIT = 75
RENDEZVOUS_MARKER = "ftlab rendezvous timeout: "


class RendezvousTimeout(LaunchError):
    """The nodes did not all join within ``launch.rendezvous_timeout``: a setting or a
    node to fix, reported in one line (exit 2)."""


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


def multi_node_worker() -> bool:
    """True in a worker of a job that spans several nodes (Paddle sets PADDLE_NNODES)."""
    return inside_worker() and int(os.environ.get("PADDLE_NNODES", "1")) > 1


def record_worker() -> None:
    """In a worker of a multi-node job: write its global rank, host and pid beside its log.

    Paddle's launcher knows each worker by its local rank only (every node counts from
    0), so its failure report cannot say which rank of the job failed; this record lets
    the node's launcher translate, and lists the job's processes. Rank, host and pid only:
    never the environment.
    """
    if not multi_node_worker() or "PADDLE_LOG_DIR" not in os.environ:
        return
    local = int(os.environ.get("PADDLE_LOCAL_RANK", "0"))
    record = {
        "rank": int(os.environ["PADDLE_TRAINER_ID"]),
        "local_rank": local,
        "world_size": int(os.environ["PADDLE_TRAINERS_NUM"]),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    path = Path(os.environ["PADDLE_LOG_DIR"]) / WORKER_RECORD.format(local_rank=local)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)


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
    if not (math.isfinite(lc.rendezvous_timeout) and lc.rendezvous_timeout > 0):
        raise ConfigError(
            f"launch.rendezvous_timeout={lc.rendezvous_timeout}: must be a number of seconds > 0."
        )


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
    cmd = [sys.executable, "-m", "ftlab.distributed.paddle_launch"]
    if lc.nnodes > 1:
        # ftlab's own option (paddle_launch takes it off): Paddle's master waits forever.
        cmd += ["--rendezvous_timeout", f"{lc.rendezvous_timeout:g}"]
    cmd += [
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
    started = time.time()
    code, output = run_launcher(cmd, log_dir)
    if code == RENDEZVOUS_EXIT and RENDEZVOUS_MARKER in output:
        reason = output[output.rindex(RENDEZVOUS_MARKER) + len(RENDEZVOUS_MARKER) :]
        raise RendezvousTimeout(
            f"launch.nnodes={run.launch.nnodes}: {reason.strip().splitlines()[0]}",
            {"rendezvous_timeout": run.launch.rendezvous_timeout},
        )
    if code != 0:
        raise analyse_failure(run, code, output, log_dir, since=started - 1)
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
