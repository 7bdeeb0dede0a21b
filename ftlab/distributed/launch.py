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

A node that fails takes the job down (measured on this machine: both launchers exit within
6 s of a SIGKILL of one node's worker). Gloo ends the surviving workers' collectives with
an error once their peer's sockets close, and each node's launcher names the rank that
failed first: every worker of a multi-node job records its global rank, host and pid in
``worker.<local rank>.json`` beside its log, the node whose worker failed by itself writes
``failed.json`` there, and a node whose workers only lost their peer reads the other
nodes' ``failed.json`` (or gloo's ``pair_rank``) to name the culprit.

Paddle's launcher would dump every worker's whole environment (``envlog.*``,
``backup_env.*.json``, the pod log) into the run dir; environments hold tokens and
passwords, and a SIGKILL leaves no chance to delete them, so ``paddle_launch`` keeps
them from being written at all.
"""

from __future__ import annotations

import collections
import dataclasses
import json
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
from ftlab.distributed.slurm import slurm_master
from ftlab.errors import ConfigError, FtlabError
from ftlab.record.rundir import SUMMARY, RunDir, write_json_atomic
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
    r"^(LAUNCH (INFO|DEBUG)\b|\S+\.py:\d+: \w*Warning: |\s+warnings\.warn\("
    # its master's HTTP requests (httpx logs each one), and paddle_launch's timeout line
    r"|\[[\d\-: ,]+\] \[\s*INFO\] _client\.py:\d+ - HTTP Request: |ftlab rendezvous timeout: )"
)


# paddle_launch ends with this code and a line starting with the marker when the nodes
# did not all join within launch.rendezvous_timeout (EX_TEMPFAIL: nothing ran yet).
RENDEZVOUS_EXIT = 75
RENDEZVOUS_MARKER = "ftlab rendezvous timeout: "
# Per node (its log dir): each worker's rank record, and the failure this node caused.
WORKER_RECORD = "worker.{local_rank}.json"
FAILED_RECORD = "failed.json"
# How long a node whose workers only lost their peer waits for the failing node's
# failed.json (that node's launcher notices its worker's death within ~2-5 s here).
PEER_REPORT_SECONDS = 15.0
# What a worker's log shows when it failed because a peer went away (gloo's TCP pair: a
# closed socket, or ~30 s without an answer from a peer that froze).
PEER_LOST = re.compile(
    r"gloo::(IoException|TimeoutException)|Connection (reset|closed) by peer"
    r"|gloo/transport/tcp/\S+\] TIMEOUT"
)
GLOO_PAIR = re.compile(r"self_rank = (\d+) pair_rank = (\d+) peer_str = (\S+)")
GLOO_PEER = re.compile(r"Read error (\S+): Connection (?:reset|closed) by peer")


class LaunchError(FtlabError):
    """A worker of a multi-process run failed; the message carries its log tail.

    ``status_fields`` go into the run's ``status.json`` (the failed global rank, its host
    and exit), so that the record names the rank without parsing the message.
    """

    def __init__(self, message: str, status_fields: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status_fields = dict(status_fields or {})


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


FAILED_RANK = re.compile(r"rank\s+(\d+)\s+status\s+failed.*?code\s+(-?\d+)", re.I)
WORKER_ERROR = re.compile(r"^ftlab: error: .*$", re.M)


def failed_ranks(launcher_output: str, log_dir: Path) -> list[tuple[int, int | None]]:
    """(local rank, exit code) of the failed workers: from the launcher's report, else the logs.

    Paddle's launcher reports ``Container rank N status failed ... code C`` (N counts the
    node's own workers from 0); when that line is missing (the launcher itself was
    killed), the ranks whose log holds a traceback are named, with an unknown exit code.
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


@dataclasses.dataclass(frozen=True)
class WorkerFailure:
    """One failed worker of this node, as its launcher and its log tell it."""

    local_rank: int
    exit_code: int | None
    rank: int  # in the job (the local rank when the worker left no record: one node)
    host: str | None
    log: Path
    tail: str
    peer_lost: bool  # it stopped because a collective peer went away, not by itself

    def where(self) -> str:
        if self.host is None:
            return f"rank {self.rank}"
        return (
            f"rank {self.rank} (host {self.host}, local rank {self.local_rank}, "
            f"logs/{self.log.parent.name})"
        )

    def error_line(self) -> str:
        """The worker's own one-line ftlab error, if it printed one."""
        found = WORKER_ERROR.findall(self.tail)
        return f": {found[-1].rstrip('.')}" if found else ""


def exit_text(code: int | None) -> str:
    """``exit 2``, ``killed by SIGKILL, exit -9`` (Paddle reports signals as negative codes)."""
    if code is None:
        return "exit unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}, exit {code}"
        except ValueError:
            pass
    return f"exit {code}"


def worker_failures(launcher_output: str, log_dir: Path) -> list[WorkerFailure]:
    """This node's failed workers with their job rank; those that failed by themselves first."""
    out = []
    for local, code in failed_ranks(launcher_output, log_dir):
        path = log_dir / f"workerlog.{local}"
        tail = log_tail(path, 200)
        record = read_record(log_dir / WORKER_RECORD.format(local_rank=local))
        out.append(
            WorkerFailure(
                local_rank=local,
                exit_code=code,
                rank=int(record.get("rank", local)),
                host=record.get("host"),
                log=path,
                tail=tail,
                peer_lost=bool(PEER_LOST.search(tail)),
            )
        )
    return sorted(out, key=lambda f: (f.peer_lost, f.rank))


def read_record(path: Path) -> dict:
    """A small JSON record; {} when absent or half-written (the writer was killed)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def peer_report(nodes_dir: Path, own: Path, since: float, wait: float) -> dict | None:
    """Another node's ``failed.json`` written since ``since``, waiting up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        for f in sorted(nodes_dir.glob(f"node-*/{FAILED_RECORD}")):
            if f.parent != own and f.stat().st_mtime >= since:
                report = read_record(f)
                if "rank" in report:
                    return report
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return f"(no log at {path})"
    with open(path, errors="replace") as f:
        return "".join(collections.deque(f, maxlen=lines)).rstrip()


def _short_tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


def analyse_failure(
    run: RunConfig,
    code: int,
    launcher_output: str,
    log_dir: Path,
    since: float = 0.0,
    peer_wait: float = PEER_REPORT_SECONDS,
) -> LaunchError:
    """The error of a failed launch: the rank that failed first, where, how, its log tail.

    On one node that is the failed worker (one that failed by itself before one that only
    lost its peer). With several nodes, a node whose own worker failed writes
    ``failed.json`` into its log dir; a node whose workers only lost their peer names the
    rank from the other node's ``failed.json`` (waiting up to ``peer_wait`` s for it), else
    from gloo's ``pair_rank``.
    """
    head = (
        f"parallel={run.parallel.name}: the distributed job failed (paddle.distributed."
        f"launch exited with {code})."
    )
    failures = worker_failures(launcher_output, log_dir)
    if not failures:
        tail = "\n".join(launcher_output.rstrip().splitlines()[-LOG_TAIL_LINES:])
        return LaunchError(
            f"{head} No worker reported a failure; the launcher's last lines:\n{tail}\n"
            f"Worker logs: {log_dir}/workerlog.<rank>."
        )
    first = failures[0]
    others = ", ".join(str(f.rank) for f in failures[1:])
    also = f"; ranks {others} failed too" if others else ""
    multi_node = run.launch.nnodes > 1
    if not first.peer_lost or not multi_node:
        fields = {"failed_rank": first.rank, "failed_exit": first.exit_code}
        if first.host is not None:
            fields["failed_host"] = first.host
        if multi_node:  # tell the other nodes who failed
            write_json_atomic(
                log_dir / FAILED_RECORD,
                {
                    "rank": first.rank,
                    "host": first.host,
                    "exit_code": first.exit_code,
                    "node": log_dir.name,
                },
            )
        return LaunchError(
            f"{head} R{first.where()[1:]} failed ({exit_text(first.exit_code)}){first.error_line()}"
            f"{also}. Last lines of {first.log}:\n{_short_tail(first.tail)}",
            fields,
        )
    # Every failed worker here only lost its peer: the culprit ran on another node.
    report = peer_report(log_dir.parent, log_dir, since, peer_wait)
    pair = GLOO_PAIR.search(first.tail)
    if report is not None:
        culprit = (
            f"Rank {report['rank']} (host {report.get('host')}, logs/{report.get('node')}) "
            f"failed ({exit_text(report.get('exit_code'))})"
        )
        fields = {
            "failed_rank": report["rank"],
            "failed_host": report.get("host"),
            "failed_exit": report.get("exit_code"),
        }
    elif pair is not None:
        culprit = (
            f"Rank {pair.group(2)} (gloo peer {pair.group(3)}) went away, and its node "
            f"wrote no {FAILED_RECORD} within {peer_wait:g} s (that node may be down)"
        )
        fields = {"failed_rank": int(pair.group(2))}
    else:
        peer = GLOO_PEER.search(first.tail)
        culprit = (
            f"A rank on another node (gloo peer {peer.group(1) if peer else 'unknown'}) went "
            f"away, and no node wrote a {FAILED_RECORD} within {peer_wait:g} s"
        )
        fields = {}
    fields["stopped_ranks"] = [f.rank for f in failures]
    return LaunchError(
        f"{head} {culprit}; on this node {first.where()} stopped because its collective "
        f"peer was gone ({exit_text(first.exit_code)}){also}. Last lines of {first.log}:\n"
        f"{_short_tail(first.tail)}",
        fields,
    )


def failure_message(run: RunConfig, code: int, launcher_output: str, log_dir: Path) -> str:
    """The text of ``analyse_failure`` without waiting for other nodes."""
    return str(analyse_failure(run, code, launcher_output, log_dir, peer_wait=0.0))


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
