"""The stage interface and its registry: a leaf that imports no stage.

A training stage is what a run optimises: ``sft`` (next-token loss on answers, the
default), ``dpo`` (a preference loss on chosen vs rejected responses, with its variants)
and ``kto`` (desirable vs undesirable completions). A stage is one YAML in
``conf/stage/`` plus one module holding its schema and one ``@register_stage`` class that
answers every question the rest of ftlab asks about it: its checks against the method,
layout and data settings; its derived values (the reference model, the loss PaddleNLP
runs); the data it reads; the Trainer it trains with; the metrics its summary reports;
its effect on the plan (a reference model); its export (which PaddleNLP script, which
keys). ``ftlab.training.run`` runs every stage through the same four steps and asks
the stage only where they differ.

This module must stay importable without Paddle (composition and planning).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ftlab.config.schema import StageConfig
from ftlab.record.rundir import EXPORT

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig

# How a stage gets the model its loss compares against (the policy before training).
REFERENCE_NONE = "none"  # no reference (SFT; reference-free preference losses)
REFERENCE_ADAPTER = "adapter"  # the trained model with its adapter switched off
REFERENCE_COPY = "copy"  # a frozen copy of the starting model


@dataclass
class StagePlan:
    """What a stage adds to the memory of a run, and the plan's lines about it."""

    reference: str = REFERENCE_NONE
    details: dict[str, Any] = field(default_factory=dict)  # plan.json's stage section
    lines: list[str] = field(default_factory=list)
    # Bytes the stage holds beyond weights, optimizer and the training step's activations
    # (GRPO: the generation KV cache and the group's logits), added to the plan's total.
    extra_bytes: float = 0.0


class Stage:
    """One training objective: its settings, data, Trainer, metrics, plan and export."""

    name: ClassVar[str]
    schema: ClassVar[type[StageConfig]]
    # data.format values the stage reads; ``auto`` detects among them.
    data_formats: ClassVar[tuple[str, ...]]
    # The PaddleNLP script ``mode=export`` writes an argument file for, and its name.
    export_script: ClassVar[str] = "llm/run_finetune.py"
    export_file: ClassVar[str] = EXPORT
    # Logged metrics the summary reports for the last training interval and the dev set.
    summary_keys: ClassVar[tuple[str, ...]] = ()
    # The eval loss is a token mean of -log p (so its exponential is a perplexity).
    loss_is_likelihood: ClassVar[bool] = True

    def check(self, run: RunConfig, env: Environment) -> None:
        """Reject settings this stage cannot honour with this method, layout and data."""

    def derived(self, run: RunConfig) -> dict[str, Any]:
        """Values computed from the settings, written into the resolved config."""
        return {}

    def reference(self, run: RunConfig) -> str:
        """``none``, ``adapter`` or ``copy`` (see the constants above)."""
        return REFERENCE_NONE

    def plan(self, run: RunConfig) -> StagePlan:
        return StagePlan(reference=self.reference(run))

    def export(self, run: RunConfig, args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        """The argument file for ``export_script`` (stages whose ``export_file`` is not
        ``run_finetune.json``): ``args`` holds the model, training and method keys as
        ``run_finetune.py`` has them; the stage adds its data and loss keys."""
        raise NotImplementedError(f"stage={self.name} has no export of its own")

    def build_data(self, run: RunConfig, tokenizer: Any) -> Any:
        """The run's ``ftlab.data.DataBundle``."""
        raise NotImplementedError

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        """The Trainer; ``kwargs`` are what every ftlab Trainer takes (model, args, data,
        collator, callbacks, token counter, shuffle)."""
        raise NotImplementedError


def process_count(run: RunConfig) -> int:
    """Processes the layout runs (for stages that train on one process only)."""
    p = run.parallel
    ranks = (p.data or 1) * p.tensor * p.pipeline * max(p.sharding, 1)
    return max(ranks, (p.nproc_per_node or 1) * run.launch.nnodes)


_STAGES: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    if cls.name in _STAGES:
        raise ValueError(f"stage {cls.name!r} registered twice")
    _STAGES[cls.name] = cls
    return cls


def registered_stages() -> dict[str, type[Stage]]:
    return dict(_STAGES)
