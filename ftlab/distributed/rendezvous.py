"""The nodes of one job must run one config: compared when the workers meet.

Every node composes its config from its own command line, so two nodes given different
overrides (a learning rate typed on one node only, another dataset path) would train one
job on two configs: data parallelism would average gradients of different setups, or
the ranks would deadlock on tensors of different shapes. Before any data or model is
loaded, each worker of a multi-node job puts a digest of its composed config, and the
flattened config, into the job's TCP store (the one Paddle's collectives use next; rank
0 serves it). Rank 0 compares every rank's digest with its own and publishes a verdict;
every rank then fails with the same one-line message naming the first differing key, so
each node's launcher reports it. Nothing is excluded from the comparison: the composed
config holds no per-node value (the run dir and Hydra's runtime keys are not part of it),
and a node that should legitimately differ would be a different job.

Each wait is bounded by ``launch.rendezvous_timeout`` (the store's own ``get`` would
block for 15 minutes): the counters are polled with ``add(key, 0)``, which never blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Any

from ftlab.config.overrides import flatten
from ftlab.errors import ConfigError

PREFIX = "ftlab/config"
POLL_SECONDS = 0.2
# How long rank 0 keeps the store up after a refusal for the others to read it.
READ_GRACE_SECONDS = 30.0
ABSENT = "<absent>"


def flat_config(cfg: Any) -> dict[str, Any]:
    """``{"train.learning_rate": 0.01, ...}`` of a composed config (interpolations resolved)."""
    from omegaconf import DictConfig, OmegaConf

    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    return flatten(tree)


def config_digest(flat: dict[str, Any]) -> str:
    """sha256 of the flattened config (key order does not matter)."""
    text = json.dumps(flat, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first key (in sorted order) whose value differs, with both values."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va != vb:
            return key, va, vb
    return None


def mismatch_message(
    key: str, value_a: Any, value_b: Any, node_a: dict[str, Any], node_b: dict[str, Any]
) -> str:
    """One line: the first differing key, with each node's value and where it ran."""

    def node(n: dict[str, Any]) -> str:
        return f"rank {n['rank']} on host {n['host']}"

    return (
        f"the nodes of this job were given different configs; first difference: {key}: "
        f"{value_a!r} ({node(node_a)}) vs {value_b!r} ({node(node_b)}). Start every node "
        "with the same overrides."
    )


def _wait_count(store: Any, key: str, wanted: int, deadline: float) -> int:
    """Poll the counter ``key`` until it reaches ``wanted`` or ``deadline``; its last value."""
    while True:
        value = store.add(key, 0)
        if value >= wanted or time.monotonic() >= deadline:
            return value
        time.sleep(POLL_SECONDS)


def _get_json(store: Any, key: str) -> dict[str, Any]:
    return json.loads(bytes(store.get(key)).decode())


def check_same_config(
    cfg: Any,
    timeout: float,
    store: Any = None,
    rank: int | None = None,
    world: int | None = None,
) -> None:
    """In a worker of a multi-node job: fail unless every rank composed the same config.

    ``store`` is the job's TCP store (by default Paddle's global one, created here from
    the launcher's environment and reused by ``init_parallel_env``); ``rank`` and
    ``world`` default to what Paddle's launcher set.
    """
    if store is None:
        from paddle.base import core

        store = core.create_or_get_global_tcp_store()
    rank = int(os.environ["PADDLE_TRAINER_ID"]) if rank is None else rank
    world = int(os.environ["PADDLE_TRAINERS_NUM"]) if world is None else world
    flat = flat_config(cfg)
    me = {"rank": rank, "host": socket.gethostname(), "digest": config_digest(flat)}
    store.set(f"{PREFIX}/node/{rank}", json.dumps(me).encode())
    store.set(f"{PREFIX}/flat/{rank}", json.dumps(flat, default=str).encode())
    store.add(f"{PREFIX}/joined", 1)
    deadline = time.monotonic() + timeout
    if rank == 0:
        verdict = _verdict(store, me, flat, world, deadline, timeout)
        store.set(f"{PREFIX}/verdict", verdict.encode())
        store.add(f"{PREFIX}/decided", 1)
        if verdict:
            # The others read the verdict from this process's store: keep it up until
            # they have (or a short while), then fail like them.
            grace = time.monotonic() + min(timeout, READ_GRACE_SECONDS)
            _wait_count(store, f"{PREFIX}/read", world - 1, grace)
            raise ConfigError(verdict)
        return
    if _wait_count(store, f"{PREFIX}/decided", 1, deadline) < 1:
        raise ConfigError(
            f"rank 0 did not finish the nodes' config check within launch.rendezvous_timeout="
            f"{timeout:g} s."
        )
    verdict = bytes(store.get(f"{PREFIX}/verdict")).decode()
    store.add(f"{PREFIX}/read", 1)
    if verdict:
        raise ConfigError(verdict)


def _verdict(
    store: Any,
    me: dict[str, Any],
    flat: dict[str, Any],
    world: int,
    deadline: float,
    timeout: float,
) -> str:
    """Rank 0's finding: '' when every rank's digest equals its own, else the message."""
    joined = _wait_count(store, f"{PREFIX}/joined", world, deadline)
    if joined < world:
        return (
            f"only {joined} of {world} ranks reached the nodes' config check within "
            f"launch.rendezvous_timeout={timeout:g} s."
        )
    for r in range(1, world):
        other = _get_json(store, f"{PREFIX}/node/{r}")
        if other["digest"] == me["digest"]:
            continue
        diff = first_difference(flat, _get_json(store, f"{PREFIX}/flat/{r}"))
        if diff is None:  # equal values that serialise differently: still name the ranks
            return f"rank {r}'s config digest differs from rank 0's with no differing key."
        return mismatch_message(*diff, me, other)
    return ""
