"""``python -m ftlab.distributed.paddle_launch ARGS``: Paddle's launcher, as ftlab runs it.

The same ``paddle.distributed.launch`` with the same arguments, plus two things ftlab
needs and Paddle does not do:

* it dies with the ``ftlab`` process that started it (SIGTERM on the parent's death,
  which Paddle's launcher handles by stopping its workers), and tells its workers its own
  pid, which they die with (``ftlab.distributed.launch.die_with_launcher``);
* it writes no copy of the process environment into the log directory (the run dir):
  Paddle's launcher writes every worker's environment to ``envlog.<rank>``, the whole
  environment to the pod log and to ``backup_env.<rank>.json``. Environments hold tokens
  and passwords. The backup file exists for variables too long for an environment
  (endpoint lists of thousands of ranks); here it holds only those, never the rest.

and one thing Paddle's HTTP master lacks: a bound on the rendezvous. With ``--master``
Paddle's launcher waits for the master and for every node without end (it retries
``master not ready`` and ``Waiting peer start...`` forever), so a master that never
answers would hang the job. ``--rendezvous_timeout SECONDS`` (ftlab's own option, taken
off the command line before Paddle's parser sees it) ends this process with
``RENDEZVOUS_EXIT`` and one line naming the master and what it saw when the workers have
not been started by then; no worker exists yet at that point.

The patched functions are checked before the launch: a Paddle version without them
fails here, loudly, rather than dumping environments unnoticed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from ftlab.distributed.launch import (
    JOB_ID,
    PARENT_PID_ENV,
    RENDEZVOUS_EXIT,
    RENDEZVOUS_MARKER,
    die_with_parent,
)

RENDEZVOUS_FLAG = "--rendezvous_timeout"
WATCH_SLICE = 3600.0  # the rendezvous watchdog's longest single wait, seconds
# How long the timeout's probe of the master may take (it only shapes the message).
PROBE_SECONDS = 2.0


def _no_env_dump(self: Any, *args: Any, **kwargs: Any) -> None:
    """Replaces ``Controller._save_container_env`` and ``save_pod_log``."""


def _start_without_env_backup(self: Any) -> None:
    """``ProcessContext._start`` whose backup file holds only the overlong variables."""
    from paddle.distributed.launch.utils.process_context import LIMIT_LEN_ENVS

    log_dir = self._env["PADDLE_LOG_DIR"]
    os.makedirs(log_dir, exist_ok=True)
    env = dict(self._env)
    rank = env.get("PADDLE_TRAINER_ID")
    if rank is not None:
        limit = int(os.getenv("PADDLE_ENV_LIMIT_LEN", 48000))
        overlong = {k: env.pop(k) for k in LIMIT_LEN_ENVS if len(env.get(k, "")) >= limit}
        if overlong:
            path = os.path.join(log_dir, f"backup_env.{int(rank)}.json")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(overlong, f)
            env["PADDLE_BACKUP_ENV_PATH"] = path
    self._proc = subprocess.Popen(
        self._cmd,
        env=env,
        stdout=self._stdout,
        stderr=self._stderr,
        preexec_fn=self._preexec_fn or (os.setsid if self._group else None),
        shell=self._shell,
    )


def quiet_env_dumps() -> None:
    """Patch Paddle's launcher so that no file holds the process environment."""
    from paddle.distributed.launch.controllers.controller import Controller
    from paddle.distributed.launch.utils import process_context

    needed = [
        (Controller, "_save_container_env"),
        (Controller, "save_pod_log"),
        (process_context.ProcessContext, "_start"),
        (process_context, "LIMIT_LEN_ENVS"),
    ]
    missing = [f"{getattr(o, '__name__', o)}.{name}" for o, name in needed if not hasattr(o, name)]
    if missing:
        raise RuntimeError(
            f"this PaddlePaddle's launcher lacks {', '.join(missing)}: ftlab cannot keep it "
            "from writing the process environment into the run dir. Use the PaddlePaddle "
            "version in constraints.txt."
        )
    Controller._save_container_env = _no_env_dump
    Controller.save_pod_log = _no_env_dump
    process_context.ProcessContext._start = _start_without_env_backup


def pop_option(argv: list[str], flag: str) -> tuple[list[str], str | None]:
    """``argv`` without the launcher option ``flag VALUE``, and its value (None if absent).

    Only the launcher's own options are read: they come as ``--name value`` pairs before
    the worker's command, whose arguments are left alone.
    """
    i = 0
    while i + 1 < len(argv) and argv[i].startswith("--"):
        if argv[i] == flag:
            return argv[:i] + argv[i + 2 :], argv[i + 1]
        i += 2
    return list(argv), None


def option_value(argv: list[str], flag: str) -> str | None:
    """The value of the launcher option ``flag`` in ``argv`` (None if absent)."""
    return pop_option(argv, flag)[1]


def master_answers(master: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, port = master.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def nodes_joined(master: str, timeout: float = PROBE_SECONDS) -> int | None:
    """How many nodes have registered with Paddle's HTTP master (None: no answer)."""
    url = f"http://{master}/{JOB_ID}/info"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - http only
            return len(json.loads(r.read() or b"{}"))
    except (OSError, ValueError):
        return None


def rendezvous_timeout_message(master: str | None, nnodes: str | None, seconds: float) -> str:
    """One line: what the rendezvous saw when its time ran out."""
    where = f"launch.rendezvous_timeout={seconds:g} s"
    if not master:
        return f"the workers were not started within {where}."
    if not master_answers(master):
        return (
            f"no answer from the master launch.master={master} within {where}: nothing "
            "listens there or it cannot be reached from this node. Start the node that "
            "owns that address (it becomes the master) or correct launch.master."
        )
    joined = nodes_joined(master)
    seen = f"{joined} of {nnodes}" if joined is not None else f"not all {nnodes}"
    return (
        f"the master launch.master={master} answers, but {seen} nodes joined within "
        f"{where}. Start every node with the same launch.master and launch.nnodes."
    )


def bound_rendezvous(seconds: float, master: str | None, nnodes: str | None) -> None:
    """End this process if Paddle's launcher has not started its workers in ``seconds``.

    Paddle's launcher starts its workers (``deploy_pod``) only once every node joined;
    until then nothing but this process and its master thread run, so ``os._exit`` is a
    complete stop. The marker line tells the ftlab process why.
    """
    from paddle.distributed.launch.controllers.controller import ControllerBase

    deployed = threading.Event()
    original = ControllerBase.deploy_pod

    def deploy_pod(self: Any) -> None:
        deployed.set()
        original(self)

    def stop(message: str) -> None:
        print(f"{RENDEZVOUS_MARKER}{message}", flush=True)
        os._exit(RENDEZVOUS_EXIT)

    def watch() -> None:
        # Waits in bounded slices (one huge wait overflows Python's timeout: the thread
        # died and the job waited forever); any failure here stops the launcher, since a
        # dead watchdog would leave nothing to end the wait.
        try:
            deadline = time.monotonic() + seconds
            while not deployed.wait(min(WATCH_SLICE, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    stop(rendezvous_timeout_message(master, nnodes, seconds))
        except BaseException as err:  # noqa: BLE001 - reported in the marker line
            stop(f"the rendezvous watchdog failed ({type(err).__name__}: {err}); stopped.")

    ControllerBase.deploy_pod = deploy_pod
    threading.Thread(target=watch, name="ftlab-rendezvous-watchdog", daemon=True).start()


def main() -> None:
    die_with_parent(signal.SIGTERM)
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # what the workers die with
    argv, timeout = pop_option(sys.argv[1:], RENDEZVOUS_FLAG)
    sys.argv = [sys.argv[0], *argv]
    quiet_env_dumps()
    if timeout is not None:
        master = option_value(argv, "--master")
        bound_rendezvous(float(timeout), master, option_value(argv, "--nnodes"))
    from paddle.distributed.launch.main import launch

    launch()


if __name__ == "__main__":
    main()
