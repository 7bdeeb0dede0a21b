"""Why a multi-process job failed: which rank of the job, on which host, and how.

Paddle's launcher reports a failed worker by its local rank (every node counts its own
workers from 0) and with a negative code for a signal. This module turns that, the
workers' logs and the workers' rank records into one ``LaunchError`` naming the job's
rank that failed first, with its host, its exit and the tail of its log:

* every worker of a multi-node job records its global rank, host and pid in
  ``worker.<local rank>.json`` beside its log (``ftlab.distributed.launch.record_worker``);
* the node whose worker failed by itself writes ``failed.json`` into its log dir;
* a node whose workers only stopped because their collective peer went away (gloo's
  closed socket, or its ~30 s timeout on a frozen peer) names the rank from the other
  node's ``failed.json``, waiting a little for it, else from gloo's ``pair_rank``.

Measured on this machine (two launchers as two nodes, SIGKILL of one worker): both
launchers exit within 1.4-5.7 s naming the killed rank.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import signal
import time
from pathlib import Path

from ftlab.config.schema import RunConfig
from ftlab.errors import FtlabError
from ftlab.record.rundir import write_json_atomic

LOG_TAIL_LINES = 40

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
