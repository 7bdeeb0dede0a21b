"""``parallel=auto``'s search: every layout the devices allow, validated, sized by the plan,
timed by the cost model and ranked (``ftlab.planning.auto`` says what is searched)."""

from __future__ import annotations

from dataclasses import replace

from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.distributed.degrees import Degrees
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method
from ftlab.planning.candidates import (
    BATCH,
    MEMORY,
    RULE,
    Candidate,
    RecomputeChoice,
    candidate_run,
    recompute_choice_named,
    recompute_choices,
)
from ftlab.planning.cost import Hardware
from ftlab.planning.plan import count_parameters, evaluate
from ftlab.planning.report import Decision
from ftlab.resolve.validate import validate


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _structures(hw: Hardware, expert: int) -> list[Degrees]:
    """Every combination of degrees, stage, offload and sequence parallel for the devices
    (``expert``: the run's, which auto does not choose)."""
    out = []
    for n in _divisors(hw.devices_per_node):
        world = n * hw.nnodes
        for t in _divisors(n):
            for p in _divisors(world // t):
                rest = world // (t * p)
                for s in _divisors(rest):
                    for stage in (0,) if s == 1 else (1, 2, 3):
                        for offload in (False, True) if stage >= 2 else (False,):
                            for sp in (False, True) if t > 1 else (False,):
                                out.append(
                                    Degrees(
                                        nproc_per_node=n,
                                        nnodes=hw.nnodes,
                                        data=rest // s,
                                        tensor=t,
                                        pipeline=p,
                                        sharding=s,
                                        sharding_stage=stage,
                                        offload=offload,
                                        sequence_parallel=sp,
                                        expert=expert,
                                    )
                                )
    return out


def global_batch(run: RunConfig) -> int:
    """Samples per optimizer step that every candidate trains on."""
    gb = run.parallel.auto.global_batch_size
    if gb is None:
        return run.train.per_device_train_batch_size * run.train.gradient_accumulation_steps
    return gb


def _complexity(c: Candidate) -> tuple[int, ...]:
    """Among equally fast layouts, the simpler one: no offload, lower stage, fewer splits."""
    return (int(c.offload), c.sharding_stage, c.pipeline, c.tensor, int(c.sequence_parallel))


def _probe(run: RunConfig, env: Environment, degrees: Degrees, gb: int, first: RecomputeChoice):
    """The layout with the whole per-rank batch in one micro-batch, dropped when the global
    batch does not split over its ranks or validation refuses the layout."""
    ranks = degrees.data_parallel_world
    if gb % ranks:
        return Candidate(
            **degrees.as_kwargs(),
            recompute="any",
            micro_batch=None,
            accumulation=None,
            kind=BATCH,
            reason=f"the global batch of {gb} does not split over {ranks} data x sharding ranks",
        )
    probe = Candidate(
        **degrees.as_kwargs(), recompute="off", micro_batch=gb // ranks, accumulation=1
    )
    try:
        validate(candidate_run(run, probe, first), env)
    except ConfigError as err:
        return replace(probe, recompute="any", kind=RULE, reason=str(err))
    return probe


class _Splits:
    """Every recompute choice and micro-batch of a runnable layout, sized and timed (the
    method's parameter counts computed once per run)."""

    def __init__(self, run: RunConfig, env: Environment, hw: Hardware, gb: int) -> None:
        self.run, self.env, self.hw, self.gb = run, env, hw, gb
        self.choices = recompute_choices(run.parallel.auto)
        self.adapter = get_method(run.method.name).plan(run)
        self.counts = count_parameters(run, self.adapter)

    def of(self, degrees: Degrees) -> list[Candidate]:
        per_rank = self.gb // degrees.data_parallel_world
        out = []
        for choice in self.choices:
            for micro in sorted(_divisors(per_rank), reverse=True):
                cand = Candidate(
                    **degrees.as_kwargs(),
                    recompute=choice.label,
                    micro_batch=micro,
                    accumulation=per_rank // micro,
                )
                out.append(
                    evaluate(self.run, self.env, self.hw, cand, choice, self.counts, self.adapter)
                )
        return out


def _ranked(candidates: list[Candidate]) -> list[Candidate]:
    """``candidates`` with those that fit ranked: fastest first (ties: the simpler layout,
    then the larger micro-batch, then less memory)."""
    fitting = [c for c in candidates if not c.kind]
    fitting.sort(
        key=lambda c: (c.step_seconds, _complexity(c), -(c.micro_batch or 0), c.memory_gib)
    )
    ranked = {
        id(cand): replace(
            cand,
            rank=i + 1,
            status="chosen" if i == 0 else "ranked",
            reason="fastest that fits"
            if i == 0
            else f"{cand.step_seconds / fitting[0].step_seconds:.2f}x the chosen step time",
        )
        for i, cand in enumerate(fitting)
    }
    return [ranked.get(id(c), c) for c in candidates]


def choose(run: RunConfig, env: Environment, hw: Hardware) -> Decision:
    """Every candidate for ``run`` on ``hw``: validated, planned, timed and ranked."""
    gb = global_batch(run)
    splits = _Splits(run, env, hw, gb)
    candidates: list[Candidate] = []
    for degrees in _structures(hw, run.parallel.expert):
        probe = _probe(run, env, degrees, gb, splits.choices[0])
        candidates += [probe] if probe.kind else splits.of(degrees)
    return Decision(hw, gb, run.parallel.auto.memory_margin, _ranked(candidates))


def fastest_runnable(run: RunConfig, env: Environment, decision: Decision) -> Candidate | None:
    """The fastest layout that fits ``run`` (a variant of the run ``decision`` was made for:
    another method, shorter rows, recompute allowed) among the layouts its search found
    runnable. Only their memory and step time are computed again; the winner is validated
    again (the variant may refuse a layout the original took), and the next one tried."""
    runnable = [c.degrees for c in decision.candidates if c.kind in ("", MEMORY)]
    splits = _Splits(run, env, decision.hardware, decision.global_batch)
    candidates = [c for d in dict.fromkeys(runnable) for c in splits.of(d)]
    for cand in sorted((c for c in _ranked(candidates) if c.rank), key=lambda c: c.rank):
        try:
            validate(candidate_run(run, cand, recompute_choice_named(cand.recompute)), env)
        except ConfigError:
            continue
        return cand
    return None
