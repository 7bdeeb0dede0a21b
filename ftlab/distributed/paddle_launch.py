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

The patched functions are checked before the launch: a Paddle version without them
fails here, loudly, rather than dumping environments unnoticed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from typing import Any

from ftlab.distributed.launch import PARENT_PID_ENV, die_with_parent


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


def main() -> None:
    die_with_parent(signal.SIGTERM)
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # what the workers die with
    quiet_env_dumps()
    from paddle.distributed.launch.main import launch

    launch()


if __name__ == "__main__":
    main()
