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
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from ftlab.config.environment import Environment
from ftlab.config.schema import AutoLayoutSettings, ParallelConfig, RunConfig
from ftlab.distributed.layout import processes_per_node
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method, method_schemas
from ftlab.methods.registry import AdapterPlan
from ftlab.models.arch import ffn_width, kv_dim
from ftlab.planning.cost import (
    ASSUMED_GPUS_PER_NODE,
    Hardware,
    Shape,
    StepTime,
    resolve_hardware,
    step_time,
)
from ftlab.planning.plan import (
    ParamCounts,
    count_parameters,
    estimate_memory,
    layout,
)
from ftlab.record.rundir import AUTO_LAYOUT, RunDir

log = logging.getLogger(__name__)

AUTO = "auto"
GIB = 2**30
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
CLOSEST_SHOWN = 3
REASONS_SHOWN = 3  # distinct reasons printed per kind of drop
# Sequence lengths tried when suggesting a shorter data.max_length (halving, down to this).
MIN_SUGGESTED_LENGTH = 64


class NoLayoutFits(ConfigError):
    """``parallel=auto`` found no candidate that runs and fits; the message says what would."""

    def __init__(self, message: str, needs_gib: float | None, has_gib: float) -> None:
        super().__init__(message)
        self.needs_gib = needs_gib
        self.has_gib = has_gib


def is_auto(run: RunConfig) -> bool:
    return run.parallel.name == AUTO


# --------------------------------------------------------------------------- recompute


@dataclass(frozen=True)
class RecomputeChoice:
    """One recompute setting auto may choose: off, or on with a granularity
    (``train.recompute_granularity``: full, full_attn, core_attn). The plan reads the
    ``train.*`` settings it writes; the cost model the share of a layer it recomputes."""

    label: str
    granularity: str | None  # None: recompute off

    @property
    def train(self) -> dict[str, Any]:
        """The ``train.*`` settings this choice writes into the run."""
        granularity = self.granularity or "full"  # off: the schema's default, refining nothing
        return {"recompute": self.granularity is not None, "recompute_granularity": granularity}

    def shares(self, run: RunConfig) -> tuple[float, float]:
        """(share of a decoder layer's forward FLOPs run again in backward, share of its
        forward tensor-parallel all-reduces repeated). ``full`` reruns the layer;
        ``full_attn`` the attention block (projections and scores; one of the layer's two
        all-reduces); ``core_attn`` softmax(q k^T) v only (no collective)."""
        if self.granularity is None:
            return 0.0, 0.0
        if self.granularity == "full":
            return 1.0, 1.0
        a = run.model.arch
        h, seq = a.hidden_size, run.data.max_length
        scores = 4 * seq * h
        attention = 2 * (2 * h * h + 2 * h * kv_dim(run.model)) + scores
        layer = attention + 2 * 3 * h * ffn_width(run.model)
        if self.granularity == "full_attn":
            return attention / layer, 0.5
        return scores / layer, 0.0


RECOMPUTE_OFF = RecomputeChoice("off", None)
RECOMPUTE_ON = tuple(RecomputeChoice(g, g) for g in ("full", "full_attn", "core_attn"))


def recompute_choices(settings: AutoLayoutSettings) -> list[RecomputeChoice]:
    """The recompute settings to try (``parallel.auto.recompute``): off, and each
    granularity (they differ in what stays in memory and what is recomputed)."""
    return {
        "choose": [RECOMPUTE_OFF, *RECOMPUTE_ON],
        "off": [RECOMPUTE_OFF],
        "on": list(RECOMPUTE_ON),
    }[settings.recompute]


def recompute_choice_of(run: RunConfig) -> RecomputeChoice:
    """The recompute setting a run names itself."""
    t = run.train
    return (
        RecomputeChoice(t.recompute_granularity, t.recompute_granularity)
        if t.recompute
        else RECOMPUTE_OFF
    )


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One layout auto considered, and what became of it."""

    nproc_per_node: int
    nnodes: int
    data: int
    tensor: int
    pipeline: int
    sharding: int
    sharding_stage: int
    offload: bool
    sequence_parallel: bool
    recompute: str  # a RecomputeChoice label
    micro_batch: int | None  # None: the global batch does not split over its ranks
    accumulation: int | None
    memory_gib: float | None = None  # the plan's busiest device (CPU: estimated RSS)
    usable_gib: float | None = None
    step: dict[str, float] | None = None  # StepTime.to_dict()
    tokens_per_second: float | None = None
    status: str = "dropped"  # chosen | ranked | dropped
    kind: str = ""  # why dropped: batch | not runnable | does not fit
    reason: str = ""
    rank: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def step_seconds(self) -> float | None:
        return self.step["total"] if self.step else None

    @property
    def layout_label(self) -> str:
        """The parallel layout in short: ``tp2 pp2 sharding2/s1 dp2 sp offload``."""
        parts = []
        if self.tensor > 1:
            parts.append(f"tp{self.tensor}")
        if self.pipeline > 1:
            parts.append(f"pp{self.pipeline}")
        if self.sharding > 1:
            parts.append(f"sharding{self.sharding}/stage{self.sharding_stage}")
        if self.data > 1:
            parts.append(f"dp{self.data}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.offload:
            parts.append("offload")
        return " ".join(parts) or "single"

    @property
    def label(self) -> str:
        batch = (
            f"micro {self.micro_batch} x acc {self.accumulation}"
            if self.micro_batch
            else "batch does not split"
        )
        return (
            f"{self.layout_label} on {self.world_size} device(s), {batch}, "
            f"recompute {self.recompute}"
        )

    def parallel(self, base: ParallelConfig) -> ParallelConfig:
        return replace(
            base,
            data=self.data,
            tensor=self.tensor,
            pipeline=self.pipeline,
            sharding=self.sharding,
            sharding_stage=self.sharding_stage,
            offload=self.offload,
            sequence_parallel=self.sequence_parallel,
            nproc_per_node=self.nproc_per_node,
            cpu_emulation=False,
        )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _structures(hw: Hardware) -> list[dict[str, Any]]:
    """Every combination of degrees, stage, offload and sequence parallel for the devices."""
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
                                    dict(
                                        nproc_per_node=n,
                                        nnodes=hw.nnodes,
                                        data=rest // s,
                                        tensor=t,
                                        pipeline=p,
                                        sharding=s,
                                        sharding_stage=stage,
                                        offload=offload,
                                        sequence_parallel=sp,
                                    )
                                )
    return out


def global_batch(run: RunConfig) -> int:
    """Samples per optimizer step that every candidate trains on."""
    gb = run.parallel.auto.global_batch_size
    if gb is None:
        return run.train.per_device_train_batch_size * run.train.gradient_accumulation_steps
    return gb


def candidate_run(run: RunConfig, cand: Candidate, choice: RecomputeChoice) -> RunConfig:
    """``run`` as if the user had written the candidate's layout, batch split and recompute."""
    train = replace(run.train, **choice.train)
    if cand.micro_batch is not None:
        train = replace(
            train,
            per_device_train_batch_size=cand.micro_batch,
            gradient_accumulation_steps=cand.accumulation,
        )
    return replace(run, parallel=cand.parallel(run.parallel), train=train)


# --------------------------------------------------------------------------- decision


@dataclass
class Decision:
    """The candidates, ranked or dropped, and the one chosen (None: nothing fits)."""

    hardware: Hardware
    global_batch: int
    memory_margin: float
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)  # what was assumed, and why

    @property
    def ranked(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.rank is not None), key=lambda c: c.rank)

    @property
    def chosen(self) -> Candidate | None:
        ranked = self.ranked
        return ranked[0] if ranked else None

    @property
    def closest(self) -> list[Candidate]:
        """The candidates that run but do not fit, smallest shortfall first."""
        over = [c for c in self.candidates if c.kind == MEMORY and c.memory_gib is not None]
        return sorted(over, key=lambda c: (c.memory_gib - c.usable_gib, c.memory_gib))

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        closest = self.closest[:1]
        return {
            "hardware": self.hardware.to_dict(),
            "global_batch": self.global_batch,
            "memory_margin": self.memory_margin,
            "notes": self.notes,
            "chosen": dataclasses.asdict(chosen) if chosen else None,
            "chosen_label": chosen.label if chosen else None,
            "does_not_fit": None
            if chosen or not closest
            else (
                f"does not fit: needs {closest[0].memory_gib:.1f} GiB per device, "
                f"has {closest[0].usable_gib:.1f}"
            ),
            "counts": {
                "candidates": len(self.candidates),
                "ranked": len(self.ranked),
                **{
                    kind: sum(c.kind == kind for c in self.candidates)
                    for kind in (BATCH, RULE, MEMORY)
                },
            },
            "candidates": [dataclasses.asdict(c) for c in self.ranked]
            + [dataclasses.asdict(c) for c in self.candidates if c.rank is None],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(
            hardware=Hardware(**data["hardware"]),
            global_batch=data["global_batch"],
            memory_margin=data["memory_margin"],
            candidates=[Candidate(**c) for c in data["candidates"]],
            notes=list(data.get("notes", [])),
        )


def _complexity(c: Candidate) -> tuple[int, ...]:
    """Among equally fast layouts, the simpler one: no offload, lower stage, fewer splits."""
    return (int(c.offload), c.sharding_stage, c.pipeline, c.tensor, int(c.sequence_parallel))


def choose(run: RunConfig, env: Environment, hw: Hardware) -> Decision:
    """Every candidate for ``run`` on ``hw``: validated, planned, timed and ranked."""
    from ftlab.resolve.validate import validate

    settings = run.parallel.auto
    gb = global_batch(run)
    adapter = get_method(run.method.name).plan(run)
    counts = count_parameters(run, adapter)
    choices = recompute_choices(settings)
    candidates: list[Candidate] = []
    for struct in _structures(hw):
        ranks = struct["data"] * struct["sharding"]
        if gb % ranks:
            candidates.append(
                Candidate(
                    **struct,
                    recompute="any",
                    micro_batch=None,
                    accumulation=None,
                    kind=BATCH,
                    reason=f"the global batch of {gb} does not split over {ranks} data x "
                    "sharding ranks",
                )
            )
            continue
        per_rank = gb // ranks
        probe = Candidate(**struct, recompute="off", micro_batch=per_rank, accumulation=1)
        try:
            validate(candidate_run(run, probe, choices[0]), env)
        except ConfigError as err:
            candidates.append(replace(probe, recompute="any", kind=RULE, reason=str(err)))
            continue
        for choice in choices:
            for micro in sorted(_divisors(per_rank), reverse=True):
                cand = replace(
                    probe, recompute=choice.label, micro_batch=micro, accumulation=per_rank // micro
                )
                candidates.append(_evaluate(run, env, hw, cand, choice, counts, adapter))
    fitting = [c for c in candidates if not c.kind]
    fitting.sort(
        key=lambda c: (c.step_seconds, _complexity(c), -(c.micro_batch or 0), c.memory_gib)
    )
    for i, cand in enumerate(fitting):
        cand.rank = i + 1
        cand.status = "chosen" if i == 0 else "ranked"
        cand.reason = (
            "fastest that fits"
            if i == 0
            else f"{cand.step_seconds / fitting[0].step_seconds:.2f}x the chosen step time"
        )
    return Decision(hw, gb, settings.memory_margin, candidates)


def _evaluate(
    run: RunConfig,
    env: Environment,
    hw: Hardware,
    cand: Candidate,
    choice: RecomputeChoice,
    counts: ParamCounts,
    adapter: AdapterPlan,
) -> Candidate:
    """The candidate's memory from the plan and, when it fits, its step time."""
    from ftlab.config.derived import Derived

    crun = candidate_run(run, cand, choice)
    derived = Derived(
        device=env.device,
        world_size=cand.world_size,
        nproc_per_node=cand.nproc_per_node,
        data_parallel_degree=cand.data,
        global_batch_size=(cand.micro_batch or 0)
        * (cand.accumulation or 0)
        * cand.data
        * cand.sharding,
    )
    mem = estimate_memory(crun, counts, layout(crun, derived), env.device, adapter)
    need = mem.needed / GIB  # CPU: estimated peak RSS; GPU: reserved, runtime included
    usable = hw.usable_gib(cand.nproc_per_node, run.parallel.auto.memory_margin)
    need, usable = round(need, 3), round(usable, 3)  # decided on the figures it records
    cand = replace(cand, memory_gib=need, usable_gib=usable)
    if need > usable:
        return replace(
            cand,
            kind=MEMORY,
            reason=f"needs {need:.1f} GiB per device, has {usable:.1f}",
        )
    forward_share, collective_share = choice.shares(run)
    shape = Shape(
        nproc_per_node=cand.nproc_per_node,
        data=cand.data,
        tensor=cand.tensor,
        pipeline=cand.pipeline,
        sharding=cand.sharding,
        sharding_stage=cand.sharding_stage,
        offload=cand.offload,
        sequence_parallel=cand.sequence_parallel,
        recompute=forward_share,
        recompute_collectives=collective_share,
        micro_batch=cand.micro_batch or 0,
        accumulation=cand.accumulation or 0,
        seq_len=run.data.max_length,
    )
    step: StepTime = step_time(crun, counts, adapter, shape, hw)
    tokens = (cand.micro_batch or 0) * (cand.accumulation or 0) * cand.data * cand.sharding
    tokens *= run.data.max_length
    return replace(
        cand, step=step.to_dict(), tokens_per_second=round(tokens / step.total, 1), reason=""
    )


# --------------------------------------------------------------------------- the request


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
    from ftlab.config.environment import run_environment

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
    decision.notes = list(notes or []) + _assumed(hw)
    return decision


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


def _fits(run: RunConfig, env: Environment, hw: Hardware) -> Candidate | None:
    try:
        return choose(run, env, hw).chosen
    except ConfigError:
        return None


def suggestions(run: RunConfig, env: Environment, decision: Decision) -> list[str]:
    """Changes that would make a layout fit, each checked by choosing again."""
    hw = decision.hardware
    out = []
    # More devices: a fuller node, then more nodes.
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
        found = _fits(more_run, more_env, more_hw)
        if found:
            where = (
                f"launch.nnodes={nodes}"
                if nodes != hw.nnodes
                else f"parallel.nproc_per_node={per_node}"
            )
            out.append(
                f"more devices: {per_node * nodes} ({where}) fit {found.layout_label}, "
                f"{found.memory_gib:.1f} GiB per device"
            )
            break
    if run.parallel.auto.recompute == "off":
        rc = replace(
            run, parallel=replace(run.parallel, auto=replace(run.parallel.auto, recompute="choose"))
        )
        found = _fits(rc, env, hw)
        if found:
            out.append(
                f"recompute: parallel.auto.recompute=choose fits {found.layout_label} "
                f"with recompute {found.recompute}"
            )
    # The evaluation pass's logits (eval batch x seq x vocab in fp32) can set the peak.
    batch = run.train.per_device_eval_batch_size // 2
    while batch >= 1:
        smaller = replace(run, train=replace(run.train, per_device_eval_batch_size=batch))
        found = _fits(smaller, env, hw)
        if found:
            out.append(
                f"smaller evaluation batch: train.per_device_eval_batch_size={batch} fits "
                f"{found.layout_label}, {found.memory_gib:.1f} GiB per device"
            )
            break
        batch //= 2
    if run.method.name != "qlora" and "qlora" in method_schemas():
        qlora = _as_qlora(run)
        found = _fits(qlora, env, hw) if qlora else None
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
        found = _fits(shorter, env, hw)
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


# --------------------------------------------------------------------------- resolving


def apply_choice(run: RunConfig, decision: Decision) -> RunConfig:
    """``run`` with the chosen layout, batch split and recompute, as if written by the user."""
    chosen = decision.chosen
    assert chosen is not None
    choice = next(c for c in recompute_choices(run.parallel.auto) if c.label == chosen.recompute)
    return candidate_run(run, chosen, choice)


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


def layout_estimate(
    run: RunConfig, env: Environment, decision: Decision | None, notes: list[str]
) -> tuple[dict[str, Any], list[str]]:
    """What ``mode=plan`` adds to its plan: parallel=auto's ranking, or for a named layout
    whether it fits and its estimated step time on the described devices."""
    if decision is not None:
        return {"auto": decision.to_dict()}, format_decision(
            decision, run.parallel.auto.show
        ).splitlines()
    p, t = run.parallel, run.train
    try:
        hw = resolve_hardware(run, env, processes_per_node(p))
    except ConfigError as err:
        return {"estimate": None}, [f"estimate        n/a: {err}"]
    world = hw.devices_per_node * hw.nnodes
    cand = Candidate(
        nproc_per_node=hw.devices_per_node,
        nnodes=hw.nnodes,
        data=world // (p.tensor * p.pipeline * p.sharding),
        tensor=p.tensor,
        pipeline=p.pipeline,
        sharding=p.sharding,
        sharding_stage=p.sharding_stage,
        offload=p.offload,
        sequence_parallel=p.sequence_parallel,
        recompute=recompute_choice_of(run).label,
        micro_batch=t.per_device_train_batch_size,
        accumulation=t.gradient_accumulation_steps,
    )
    choice = recompute_choice_of(run)
    adapter = get_method(run.method.name).plan(run)
    cand = _evaluate(run, env, hw, cand, choice, count_parameters(run, adapter), adapter)
    margin = AutoLayoutSettings().memory_margin
    if cand.kind:
        verdict = f"does not fit: {cand.reason} ({margin:.0%} margin)"
    else:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in cand.step.items() if v and k != "total")
        verdict = (
            f"fits ({_gib(cand.memory_gib)} of {_gib(cand.usable_gib)} usable, {margin:.0%} "
            f"margin); step {cand.step_seconds:.4g} s = {parts}; "
            f"{cand.tokens_per_second:,.0f} tokens/s"
        )
    lines = [f"estimate       on {hw.describe()}", f"               {verdict}"]
    lines += [f"{'figures' if i == 0 else '':<14} {n}" for i, n in enumerate(notes + _assumed(hw))]
    return {"estimate": {"hardware": hw.to_dict(), **dataclasses.asdict(cand)}}, lines


def _assumed(hw: Hardware) -> list[str]:
    """Where the numbers not set by ``launch.*`` came from, one line per source."""
    by_source: dict[str, list[str]] = {}
    for key, source in hw.sources.items():
        if not source.startswith("launch."):
            by_source.setdefault(source, []).append(key)
    return [f"{source}: {', '.join(keys)}" for source, keys in by_source.items()]


# --------------------------------------------------------------------------- printing


def _gib(x: float | None) -> str:
    return "" if x is None else f"{x:,.1f} GiB" if x >= 1 else f"{x * 1024:,.0f} MiB"


def format_decision(decision: Decision, show: int = 5) -> str:
    """The ranking a person reads: the top candidates, then why the rest were dropped."""
    hw = decision.hardware
    usable = hw.usable_gib(1, decision.memory_margin)
    lines = [
        "",
        "ftlab parallel=auto",
        f"  devices        {hw.describe()}",
        (
            f"  memory         {usable:.1f} GiB usable per device ({decision.memory_margin:.0%} "
            "margin" + (f", {hw.reserved_gib:g} GiB reserved)" if hw.reserved_gib else ")")
            if hw.device != "cpu"
            else f"  memory         {usable:.1f} GiB of RAM usable ({decision.memory_margin:.0%} "
            "margin), shared by a layout's processes"
        ),
        f"  global batch   {decision.global_batch} samples per step",
    ]
    lines += [f"  {'figures' if i == 0 else '':<14} {n}" for i, n in enumerate(decision.notes)]
    ranked = decision.ranked
    header = (
        f"  {'rank':>4}  {'layout':<30} {'micro x acc':>11}  {'recompute':<9} "
        f"{'memory':>10}  {'step s':>9}  {'tokens/s':>10}"
    )
    if ranked:
        lines += ["", header]
        for c in _best_per_layout(ranked)[:show]:
            lines.append(
                f"  {c.rank:>4}  {c.layout_label + f' ({c.world_size} dev)':<30} "
                f"{f'{c.micro_batch} x {c.accumulation}':>11}  {c.recompute:<9} "
                f"{_gib(c.memory_gib):>10}  {c.step_seconds:>9.4g}  "
                f"{c.tokens_per_second:>10,.0f}"
            )
        lines.append(
            f"  (the fastest batch split and recompute of each layout; {len(ranked)} fitting "
            "candidates in auto_layout.json)"
        )
        best = ranked[0]
        parts = ", ".join(f"{k} {v:.3g}" for k, v in best.step.items() if v and k != "total")
        lines += [
            "",
            f"  chosen         {best.label}",
            f"                 step {best.step_seconds:.4g} s = {parts}",
        ]
    dropped = [c for c in decision.candidates if c.kind]
    if dropped:
        lines.append("  dropped")
        for kind in (MEMORY, RULE, BATCH):
            of_kind = [c for c in dropped if c.kind == kind]
            if not of_kind:
                continue
            if kind == MEMORY:
                c = decision.closest[0]
                lines.append(
                    f"    {len(of_kind):>5} do not fit (closest: {c.layout_label}, micro "
                    f"{c.micro_batch}, recompute {c.recompute}: {c.reason})"
                )
            else:
                lines.append(f"    {len(of_kind):>5} {kind}, e.g.")
                counted = Counter(_first_sentence(c.reason) for c in of_kind)
                lines += [f"            {r}" for r, _ in counted.most_common(REASONS_SHOWN)]
    return "\n".join(lines)


def _best_per_layout(ranked: list[Candidate]) -> list[Candidate]:
    """The best-ranked candidate of each layout (micro-batch and recompute variants folded)."""
    seen: dict[tuple[str, int], Candidate] = {}
    for c in ranked:
        seen.setdefault((c.layout_label, c.world_size), c)
    return list(seen.values())


def _first_sentence(text: str) -> str:
    head = text.split(": ", 1)[-1] if text.startswith("parallel=") else text
    return head.split(". ")[0].rstrip(".")
