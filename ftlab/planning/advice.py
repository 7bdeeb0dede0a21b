"""``parallel=auto`` when nothing fits: the closest candidates and the changes that would
make one fit (more devices, recompute, QLoRA, shorter rows, more memory).

Every suggestion is checked, and checked cheaply: a change that keeps the devices (recompute,
QLoRA, shorter rows) sizes and times again the layouts the search already found runnable
(``ftlab.planning.search.fastest_runnable``) instead of searching again; only more devices,
which allow layouts the search never saw, search the larger machine.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import replace

from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.errors import ConfigError
from ftlab.methods.catalog import method_schemas
from ftlab.planning.candidates import RULE, Candidate
from ftlab.planning.cost import ASSUMED_GPUS_PER_NODE
from ftlab.planning.report import Decision
from ftlab.planning.search import choose, fastest_runnable

CLOSEST_SHOWN = 3
# Sequence lengths tried when suggesting a shorter data.max_length (halving, down to this).
MIN_SUGGESTED_LENGTH = 64


class NoLayoutFits(ConfigError):
    """``parallel=auto`` found no candidate that runs and fits; the message says what would."""

    def __init__(self, message: str, needs_gib: float | None, has_gib: float) -> None:
        super().__init__(message)
        self.needs_gib = needs_gib
        self.has_gib = has_gib


def no_fit_error(run: RunConfig, env: Environment, decision: Decision) -> NoLayoutFits:
    """The error for a decision without a choice: the closest candidates and what would fit."""
    hw = decision.hardware
    closest = decision.closest[:CLOSEST_SHOWN]
    lines = [
        f"parallel=auto: no layout of model {run.model.name} with method={run.method.name} "
        f"(data.max_length={run.data.max_length}, global batch {decision.global_batch}) "
        f"fits {hw.describe()} with a {decision.memory_margin:.0%} memory margin."
    ]
    if closest:
        lines.append("Closest candidates:")
        lines += [f"  {c.label}: {c.reason}" for c in closest]
    else:
        rules = sorted({c.reason for c in decision.candidates if c.kind == RULE})
        lines.append("No candidate passed validation:")
        lines += [f"  {r}" for r in rules[:CLOSEST_SHOWN]]
    fixes = suggestions(run, env, decision)
    if fixes:
        lines.append("What would make one fit:")
        lines += [f"  {f}" for f in fixes]
    need = closest[0].memory_gib if closest else None
    has = closest[0].usable_gib if closest else hw.usable_gib(1, decision.memory_margin)
    return NoLayoutFits("\n".join(lines), need, has or 0.0)


def _refits(run: RunConfig, env: Environment, decision: Decision) -> Candidate | None:
    """The fastest of the search's runnable layouts that fits ``run``, a changed copy of
    the run ``decision`` was made for (None: none, or the change itself is refused)."""
    try:
        return fastest_runnable(run, env, decision)
    except ConfigError:
        return None


def _more_devices(run: RunConfig, env: Environment, decision: Decision) -> str | None:
    """A fuller node, then more nodes: the first that fits, found by searching it."""
    hw = decision.hardware
    for per_node, nodes in [(hw.devices_per_node * k, hw.nnodes) for k in (2, 4, 8)] + [
        (hw.devices_per_node, hw.nnodes * k) for k in (2, 4, 8)
    ]:
        if hw.device == "cpu" and nodes == hw.nnodes:
            continue  # processes on one machine share its RAM: more of them do not help
        if per_node > ASSUMED_GPUS_PER_NODE and per_node > hw.devices_per_node and nodes == 1:
            continue  # nodes rarely hold more than 8 GPUs
        more_env = replace(env, device_count=max(env.device_count, per_node))
        more_hw = replace(hw, devices_per_node=per_node, nnodes=nodes)
        more_run = replace(
            run,
            parallel=replace(run.parallel, nproc_per_node=per_node),
            launch=replace(run.launch, nnodes=nodes),
        )
        try:
            found = choose(more_run, more_env, more_hw).chosen
        except ConfigError:
            found = None
        if found:
            where = (
                f"launch.nnodes={nodes}"
                if nodes != hw.nnodes
                else f"parallel.nproc_per_node={per_node}"
            )
            return (
                f"more devices: {per_node * nodes} ({where}) fit {found.layout_label}, "
                f"{found.memory_gib:.1f} GiB per device"
            )
    return None


def suggestions(run: RunConfig, env: Environment, decision: Decision) -> list[str]:
    """Changes that would make a layout fit, each checked (see the module docstring)."""
    hw = decision.hardware
    more = _more_devices(run, env, decision)
    out = [more] if more else []
    if run.parallel.auto.recompute == "off":
        rc = replace(
            run, parallel=replace(run.parallel, auto=replace(run.parallel.auto, recompute="choose"))
        )
        found = _refits(rc, env, decision)
        if found:
            out.append(
                f"recompute: parallel.auto.recompute=choose fits {found.layout_label} "
                f"with recompute {found.recompute}"
            )
    # The evaluation pass's logits (eval batch x seq x vocab in fp32) can set the peak.
    batch = run.train.per_device_eval_batch_size // 2
    while batch >= 1:
        smaller = replace(run, train=replace(run.train, per_device_eval_batch_size=batch))
        found = _refits(smaller, env, decision)
        if found:
            out.append(
                f"smaller evaluation batch: train.per_device_eval_batch_size={batch} fits "
                f"{found.layout_label}, {found.memory_gib:.1f} GiB per device"
            )
            break
        batch //= 2
    if run.method.name != "qlora" and "qlora" in method_schemas():
        qlora = _as_qlora(run)
        found = _refits(qlora, env, decision) if qlora else None
        if found:
            out.append(
                f"QLoRA: method=qlora (nf4) fits {found.layout_label}, "
                f"{found.memory_gib:.1f} GiB per device"
            )
    length = run.data.max_length // 2
    while length >= MIN_SUGGESTED_LENGTH:
        shorter = replace(
            run,
            data=replace(
                run.data, max_length=length, src_length=min(run.data.src_length, length // 2)
            ),
        )
        found = _refits(shorter, env, decision)
        if found:
            out.append(
                f"shorter sequences: data.max_length={length} fits {found.layout_label}, "
                f"{found.memory_gib:.1f} GiB per device"
            )
            break
        length //= 2
    closest = decision.closest
    if closest:
        c = closest[0]
        per_device = (c.memory_gib + hw.reserved_gib) / (1 - decision.memory_margin)
        if hw.device == "cpu":
            per_device *= c.nproc_per_node
        out.append(
            f"more memory: devices with at least {math.ceil(per_device)} GiB "
            f"(launch.device_memory_gib) fit {c.layout_label}"
        )
    return out


def _as_qlora(run: RunConfig) -> RunConfig | None:
    """``run`` with QLoRA (nf4) in place of its method, keeping the LoRA settings it shares."""
    schema = method_schemas()["qlora"]
    shared = {f.name for f in dataclasses.fields(schema)} - {"name"}
    values = {k: getattr(run.method, k) for k in shared if hasattr(run.method, k)}
    try:
        return replace(run, method=schema(name="qlora", **values))
    except (TypeError, ValueError):
        return None
