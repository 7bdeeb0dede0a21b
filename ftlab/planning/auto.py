"""``parallel=auto``: choose the layout that fits and is fastest, before the run is validated.

For the devices (this machine's, or ``parallel.nproc_per_node`` x ``launch.nnodes`` of a
described accelerator), the model, method, precision, ``data.max_length`` and the global
batch, every layout PaddleNLP can run is a candidate:

* processes per node: every divisor of the devices per node (fewer devices can win when
  communication would cost more than the compute they add); ``launch.nnodes`` is kept;
* tensor degree: divisors of the processes per node (tensor groups stay in a node);
  pipeline degree: divisors of what is left; the rest split into sharding x data, with
  sharding stage 1, 2 or 3 (2 and 3 also with ``parallel.offload``) when sharding > 1;
  sequence parallel on and off with tensor parallelism;
* recompute: ``recompute_choices`` (off, or on with each ``train.recompute_granularity``:
  full, full_attn, core_attn);
* micro-batch: every divisor of the batch one data rank trains per step
  (``parallel.auto.global_batch_size`` / (data x sharding)); the rest is accumulation.

Each candidate goes through validation exactly as a user's layout would (heads and layers
the degrees must divide, the method's and family's tensor/pipeline support, what PaddleNLP
combines, what this machine runs: on CPU only data parallel and sharding stage 1), then
through the plan (``estimate_memory``; it fits when the busiest device's estimate is at
most the device memory less ``parallel.auto.memory_margin`` and the profile's reserve),
then through the step-time model (``ftlab.planning.cost``). The fastest fitting candidate
is chosen (ties: the simpler layout, then the larger micro-batch, then less memory); the
run then proceeds with its degrees, batch split and recompute written into the resolved
config as if the user had typed them. Workers of a multi-process run and a resume read the
decision from the run dir (``auto_layout.json``) instead of choosing again.

This module takes the request and applies the decision; the candidates are in
``ftlab.planning.candidates``, the search in ``search``, one layout's memory and step time
in ``plan.evaluate``, the advice when nothing fits in ``advice``, the decision's JSON and
table in ``report``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from ftlab.config.environment import Environment, run_environment
from ftlab.config.schema import ParallelConfig, RunConfig
from ftlab.errors import ConfigError
from ftlab.planning.advice import no_fit_error
from ftlab.planning.candidates import candidate_run, recompute_choice_named
from ftlab.planning.cost import ASSUMED_GPUS_PER_NODE, resolve_hardware
from ftlab.planning.report import Decision, assumed_sources, format_decision
from ftlab.planning.search import choose, global_batch
from ftlab.record.rundir import AUTO_LAYOUT, RunDir

log = logging.getLogger(__name__)

AUTO = "auto"
# Settings of the parallel group that auto chooses: an explicit value contradicts it.
CHOSEN_BY_AUTO = (
    "data",
    "tensor",
    "pipeline",
    "sharding",
    "sharding_stage",
    "sequence_parallel",
    "offload",
    "cpu_emulation",
)
# Why a candidate was dropped.
BATCH, RULE, MEMORY = "batch", "not runnable", "does not fit"


def is_auto(run: RunConfig) -> bool:
    return run.parallel.name == AUTO


def check_request(run: RunConfig, overrides: list[str] | None = None) -> None:
    """Refuse settings that contradict ``parallel=auto`` (it chooses them itself)."""
    p, defaults = run.parallel, ParallelConfig(name=AUTO)
    named = {o.split("=", 1)[0].lstrip("+~") for o in overrides or []}
    for key in CHOSEN_BY_AUTO:
        value = getattr(p, key)
        if value != getattr(defaults, key) or f"parallel.{key}" in named:
            raise ConfigError(
                f"parallel=auto with parallel.{key}={value}: auto chooses the "
                f"{key.replace('_', ' ')} setting itself, so an explicit one contradicts it. "
                f"Drop parallel.{key} to let auto choose, or name the layout yourself "
                f"(e.g. parallel=single parallel.{key}={value})."
            )
    settings = p.auto
    if settings.recompute not in ("choose", "off", "on"):
        raise ConfigError(
            f"parallel.auto.recompute={settings.recompute!r} is not one of choose, off, on."
        )
    if run.train.recompute and settings.recompute == "choose":
        raise ConfigError(
            "train.recompute=true with parallel=auto (parallel.auto.recompute=choose): auto "
            "chooses recompute itself. Use parallel.auto.recompute=on to keep it on, or drop "
            "train.recompute."
        )
    if not 0 <= settings.memory_margin < 1:
        raise ConfigError(
            f"parallel.auto.memory_margin={settings.memory_margin}: a fraction in [0, 1)."
        )
    gb = global_batch(run)
    if gb < 1:
        raise ConfigError(f"parallel.auto.global_batch_size={gb}: must be at least 1.")


def devices_per_node(run: RunConfig, env: Environment) -> int:
    return run.parallel.nproc_per_node or env.device_count


def planning_environment(run: RunConfig) -> tuple[Environment, list[str]]:
    """The machine ``mode=plan parallel=auto`` plans for: this one, or with ``device=gpu`` the
    GPU machine ``target.*`` describes, with ``parallel.nproc_per_node`` GPUs per node
    (``target.gpus_per_node``, else 8, when unset)."""
    p = run.parallel
    notes = []
    if run.device == "gpu" and p.nproc_per_node is None:
        gpus = run.target.gpus_per_node or ASSUMED_GPUS_PER_NODE
        run = replace(run, parallel=replace(p, nproc_per_node=gpus))
        if run.target.gpus_per_node is None:
            notes.append(
                f"{ASSUMED_GPUS_PER_NODE} GPUs per node assumed (set target.gpus_per_node "
                "or parallel.nproc_per_node)"
            )
    return run_environment(run), notes


def decide(run: RunConfig, env: Environment, notes: list[str] | None = None) -> Decision:
    """Choose for ``run`` on ``env``; raise ``NoLayoutFits`` (with suggestions) when nothing
    fits. The decision is returned either way on the exception's ``decision``."""
    hw = resolve_hardware(run, env, devices_per_node(run, env))
    decision = choose(run, env, hw)
    decision.notes = list(notes or []) + assumed_sources(hw)
    return decision


# --------------------------------------------------------------------------- resolving


def apply_choice(run: RunConfig, decision: Decision) -> RunConfig:
    """``run`` with the chosen layout, batch split and recompute, as if written by the user."""
    chosen = decision.chosen
    assert chosen is not None
    return candidate_run(run, chosen, recompute_choice_named(chosen.recompute))


def recorded_decision(run_dir: RunDir) -> Decision | None:
    """The decision a run dir holds (None when it holds none)."""
    if not run_dir.exists(AUTO_LAYOUT):
        return None
    return Decision.from_dict(run_dir.read_json(AUTO_LAYOUT))


def resolve_auto(
    run: RunConfig,
    env: Environment,
    run_dir: RunDir,
    *,
    overrides: list[str] | None = None,
    reuse: bool = False,
    notes: list[str] | None = None,
    quiet: bool = False,
) -> tuple[RunConfig, Decision]:
    """Choose the layout (or, with ``reuse``, read the run dir's) and apply it to ``run``.

    Writes ``auto_layout.json`` into the run dir, also when nothing fits (then raises
    ``NoLayoutFits``), and prints the ranking unless ``quiet``.
    """
    check_request(run, overrides)
    decision = recorded_decision(run_dir) if reuse else None
    if decision is None:
        decision = decide(run, env, notes)
        run_dir.create()
        run_dir.write_json(AUTO_LAYOUT, decision.to_dict())
        if not quiet:
            print(format_decision(decision, run.parallel.auto.show), flush=True)
    elif not quiet:
        chosen = decision.chosen
        log.info("parallel=auto: the run dir's decision: %s", chosen.label if chosen else "none")
    if decision.chosen is None:
        raise no_fit_error(run, env, decision)
    return apply_choice(run, decision), decision
