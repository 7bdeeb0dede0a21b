"""What ``parallel=auto`` considers: a candidate layout (degrees, batch split, recompute)
and the recompute settings it may choose. The search (``ftlab.planning.search``) makes
them, the plan (``ftlab.planning.plan.evaluate``) sizes and times them, the report
(``ftlab.planning.report``) records and prints them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ftlab.config.schema import AutoLayoutSettings, ParallelConfig, RunConfig
from ftlab.distributed.degrees import Degrees
from ftlab.distributed.layout import with_degrees
from ftlab.models.arch import ffn_width, kv_dim

# Why a candidate was dropped.
BATCH, RULE, MEMORY = "batch", "not runnable", "does not fit"


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


def recompute_choice_named(label: str) -> RecomputeChoice:
    """The choice a candidate records by its label."""
    return next(c for c in (RECOMPUTE_OFF, *RECOMPUTE_ON) if c.label == label)


def recompute_choice_of(run: RunConfig) -> RecomputeChoice:
    """The recompute setting a run names itself."""
    t = run.train
    return (
        RecomputeChoice(t.recompute_granularity, t.recompute_granularity)
        if t.recompute
        else RECOMPUTE_OFF
    )


@dataclass(frozen=True, kw_only=True)
class Candidate(Degrees):
    """One layout auto considered (its degrees, batch split and recompute), and what became
    of it."""

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
    def step_seconds(self) -> float | None:
        return self.step["total"] if self.step else None

    @property
    def step_breakdown(self) -> str:
        """The step time's parts in seconds: ``compute 0.12, data_comm 0.01``."""
        return ", ".join(f"{k} {v:.3g}" for k, v in (self.step or {}).items() if v and k != "total")

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
        """``base`` with this layout. Auto does not choose the expert degree: the run's
        stays (a decision recorded before candidates carried ``expert`` holds none)."""
        return replace(with_degrees(base, self), expert=base.expert, cpu_emulation=False)


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
