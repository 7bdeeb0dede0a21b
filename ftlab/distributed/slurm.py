"""``launch.master=slurm``: the rendezvous of a multi-node job, read from the SLURM job.

On a SLURM cluster the nodes are known only once the job runs, so the command that is
submitted cannot name the master's host. With ``launch.master=slurm`` (or
``slurm:PORT``) each node's ``ftlab`` takes the first host of ``SLURM_JOB_NODELIST``
(the compact form ``gpu[01-02,05]``, expanded here the way ``scontrol show hostnames``
does) and a port derived from ``SLURM_JOB_ID``, so every node of one job computes the
same ``HOST:PORT`` and two jobs sharing a first node do not meet on one port. The node
count SLURM gives must be ``launch.nnodes`` and SLURM must start one task per node (each
``ftlab`` starts its node's per-GPU workers itself); anything else fails before the
launch, naming the setting, rather than forming a job of the wrong size or hanging.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from collections.abc import Mapping
from typing import Any

from omegaconf import OmegaConf

from ftlab.config.schema import ParallelConfig, RunConfig
from ftlab.distributed.layout import processes_per_node
from ftlab.errors import ConfigError

SLURM_MASTER = "slurm"
# Ports for ``launch.master=slurm``: below Linux's ephemeral range (32768-60999), so a
# port the kernel handed to some outgoing connection on the master is not chosen.
PORT_BASE = 20000
PORT_SPAN = 10000

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_TOKEN = re.compile(r"\[([^\[\]]*)\]|([^\[\]]+)")


def uses_slurm_master(master: str | None) -> bool:
    return master is not None and (master == SLURM_MASTER or master.startswith(f"{SLURM_MASTER}:"))


def expand_nodelist(nodelist: str) -> list[str]:
    """``gpu[01-02,05],cpu3`` -> ``[gpu01, gpu02, gpu05, cpu3]``, as ``scontrol show hostnames``.

    A host may hold several bracket groups (``r[1-2]n[1-2]`` is their product); numbers keep
    the zero padding of the range's start. Anything else is refused: a misread list would
    make the nodes disagree about their master.
    """
    hosts: list[str] = []
    for expr in _split_outside_brackets(nodelist):
        if not expr or "".join(m.group() for m in _TOKEN.finditer(expr)) != expr:
            raise _bad_nodelist(nodelist, f"{expr!r} is not a host name or NAME[ranges]")
        parts = [
            _expand_ranges(nodelist, m.group(1)) if m.group(1) is not None else [m.group(2)]
            for m in _TOKEN.finditer(expr)
        ]
        hosts += ["".join(p) for p in itertools.product(*parts)]
    return hosts


def _split_outside_brackets(nodelist: str) -> list[str]:
    """The host expressions: ``a[1-2],b`` -> ``a[1-2]``, ``b`` (commas inside brackets stay)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(c, 0)
        if depth not in (0, 1):
            raise _bad_nodelist(nodelist, f"unbalanced brackets at {i}")
        if c == "," and depth == 0:
            out.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise _bad_nodelist(nodelist, "unclosed '['")
    return [*out, nodelist[start:]]


def _expand_ranges(nodelist: str, ranges: str) -> list[str]:
    out: list[str] = []
    for item in ranges.split(","):
        m = _RANGE.fullmatch(item)
        if m is None:
            raise _bad_nodelist(nodelist, f"{item!r} is not N or N-M")
        start, end = m.group(1), m.group(2) or m.group(1)
        if int(end) < int(start):
            raise _bad_nodelist(nodelist, f"range {item!r} runs backwards")
        out += [f"{n:0{len(start)}d}" for n in range(int(start), int(end) + 1)]
    return out


def _bad_nodelist(nodelist: str, why: str) -> ConfigError:
    return ConfigError(
        f"launch.master=slurm: cannot read SLURM_JOB_NODELIST={nodelist!r} ({why}). Set "
        "launch.master=HOST:PORT to the first node yourself (`scontrol show hostnames`)."
    )


def master_port(master: str, job_id: str) -> int:
    """``slurm:PORT`` -> PORT; ``slurm`` -> a port of the job (same on all of its nodes)."""
    if master != SLURM_MASTER:
        port = master.split(":", 1)[1]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"launch.master={master!r}: the port must be 1-65535 (slurm:8090).")
        return int(port)
    if not job_id.isdigit():
        raise ConfigError(
            f"launch.master=slurm: SLURM_JOB_ID={job_id!r} is not a number to derive the port "
            "from. Give the port: launch.master=slurm:PORT."
        )
    return PORT_BASE + int(job_id) % PORT_SPAN


def slurm_master(run: RunConfig, env: Mapping[str, str] | None = None) -> RunConfig:
    """``run`` with ``launch.master`` resolved from the SLURM job (unchanged if not ``slurm``).

    ``env`` defaults to this process's environment (tests pass one).
    """
    lc = run.launch
    if not uses_slurm_master(lc.master):
        return run
    assert lc.master is not None
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST")
    if not env.get("SLURM_JOB_ID") or not nodelist:
        raise ConfigError(
            f"launch.master={lc.master}: this process is not in a SLURM job "
            "(SLURM_JOB_ID and SLURM_JOB_NODELIST are unset), so there is no node list to "
            "take the master from. Submit with `sbatch launch/slurm_multinode.sbatch` or "
            "`ftlab -m hydra/launcher=slurm_multinode ...`, or set launch.master=HOST:PORT."
        )
    hosts = expand_nodelist(nodelist)
    job_nodes = env.get("SLURM_JOB_NUM_NODES")
    if job_nodes is not None and int(job_nodes) != len(hosts):
        raise _bad_nodelist(nodelist, f"{len(hosts)} hosts but SLURM_JOB_NUM_NODES={job_nodes}")
    if len(hosts) != lc.nnodes:
        raise ConfigError(
            f"launch.nnodes={lc.nnodes} but this SLURM job has {len(hosts)} node(s) "
            f"({nodelist}). Ask SLURM for launch.nnodes nodes (--nodes; "
            "hydra/launcher=slurm_multinode takes it from launch.nnodes) or set launch.nnodes."
        )
    tasks = env.get("SLURM_NTASKS")
    if tasks is not None and int(tasks) != lc.nnodes:
        raise ConfigError(
            f"launch.master={lc.master}: this SLURM job runs {tasks} tasks on {len(hosts)} "
            "node(s); ftlab needs exactly one task per node (each ftlab starts its node's "
            "per-GPU workers). Use --ntasks-per-node=1 (hydra.launcher.tasks_per_node=1)."
        )
    port = master_port(lc.master, env["SLURM_JOB_ID"])
    launch = dataclasses.replace(lc, master=f"{hosts[0]}:{port}")
    return dataclasses.replace(run, launch=launch)


# ``conf/hydra/launcher/slurm_multinode.yaml`` reads the SLURM allocation off the run's own
# settings through these resolvers, so the node and GPU counts are stated once (as
# launch.nnodes and the layout) and a job that could not form is refused at submission,
# not after waiting in the queue. Hydra resolves them once, for the sweep's master config.


def slurm_nodes(nnodes: int, master: str | None) -> int:
    """``${slurm_nodes:${launch.nnodes},${launch.master}}`` -> the ``--nodes`` of the job."""
    if nnodes > 1 and not uses_slurm_master(master):
        raise ConfigError(
            f"launch.master={master} with hydra/launcher=slurm_multinode: SLURM picks the "
            "nodes when the job starts, so no master can be named at submission. Set "
            "launch.master=slurm (the job's first node, read on every node)."
        )
    return int(nnodes)


def slurm_gpus_per_node(parallel: ParallelConfig | Any) -> int:
    """``${slurm_gpus_per_node:${parallel}}`` -> ``--gpus-per-node``: the layout's processes
    per node (one GPU each)."""
    if not isinstance(parallel, ParallelConfig):
        parallel = OmegaConf.to_object(parallel)
    assert isinstance(parallel, ParallelConfig)
    if parallel.name == "auto" and parallel.nproc_per_node is None:
        raise ConfigError(
            "parallel=auto with hydra/launcher=slurm_multinode: the layout is chosen on the "
            "node, so the GPUs to ask for are unknown. Set parallel.nproc_per_node=<GPUs per "
            "node> (hydra.launcher.gpus_per_node follows it)."
        )
    return processes_per_node(parallel)
