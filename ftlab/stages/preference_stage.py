"""What DPO and KTO share: preference data, a reference model, checks, plan and export.

The reference model is the policy before training. For a method that can switch its
adapter off (LoRA and its variants but PiSSA, QLoRA) it is the trained model itself with
the adapter off, so no second copy is held; otherwise (full fine-tuning, PiSSA, VeRA,
LoKr) a frozen copy of the starting model, which the plan counts. Prefix tuning and ReFT
are refused (``Method.preference_unsupported`` says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from ftlab.data.formats import FORMATS
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method, registered_methods
from ftlab.stages.registry import (
    REFERENCE_ADAPTER,
    REFERENCE_COPY,
    REFERENCE_NONE,
    Stage,
    StagePlan,
)

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig

REFERENCE_LINES = {
    REFERENCE_NONE: "none (reference-free loss)",
    REFERENCE_ADAPTER: "the trained model with its adapter switched off (no second copy)",
    REFERENCE_COPY: "a frozen copy of the starting model",
}


def refuse_unsupported_method(run: RunConfig, stage: str) -> None:
    """A method whose reference is not the starting policy (``preference_unsupported``)."""
    reason = get_method(run.method.name).preference_unsupported
    if reason is not None:
        usable = sorted(n for n, m in registered_methods().items() if not m.preference_unsupported)
        raise ConfigError(
            f"method={run.method.name} with stage={stage}: {reason}. Use one of: "
            f"{', '.join(usable)}."
        )


class PreferenceStage(Stage):
    data_kind: ClassVar[str]  # ftlab.data.preference.PAIRWISE or LABELLED
    loss_is_likelihood = False

    # ------------------------------------------------------------------ settings

    def needs_reference(self, run: RunConfig) -> bool:
        return True

    def reference(self, run: RunConfig) -> str:
        if not self.needs_reference(run):
            return REFERENCE_NONE
        mode = get_method(run.method.name).reference_mode(run.method)
        return REFERENCE_ADAPTER if mode == "adapter" else REFERENCE_COPY

    def check(self, run: RunConfig, env: Environment) -> None:
        fmt, name = run.data.format, self.name
        if fmt in FORMATS:
            raise ConfigError(
                f"data.format={fmt} is SFT data (answers only); stage={name} trains on "
                f"preference records ({', '.join(self.data_formats)}). Point data at "
                "preference data (data=demo_preferences is the shipped demo set), or use "
                "stage=sft."
            )
        if fmt != "auto" and fmt not in self.data_formats:
            raise ConfigError(
                f"data.format={fmt}: stage={name} reads {', '.join(self.data_formats)}."
            )
        refuse_unsupported_method(run, name)
        p = run.parallel
        if p.pipeline > 1:
            raise ConfigError(
                f"stage={name} with parallel={p.name} (pipeline {p.pipeline}): PaddleNLP runs "
                "preference losses on pipeline models only inside its own pipeline DPO/KTO "
                "models (the criterion built into the last stage), which ftlab does not "
                "build. Use a data-parallel, sharding or tensor-parallel layout, or export "
                "the run (mode=export) for PaddleNLP's script, which supports pipelines."
            )
        if p.cpu_emulation and env.device == "cpu":
            raise ConfigError(
                f"stage={name} with parallel.cpu_emulation=true: the CPU emulation of tensor "
                "and pipeline layouts is checked for SFT only. Use parallel=single, dp2 or "
                "sharding_stage1 on CPU."
            )
        if run.data.streaming:
            raise ConfigError(
                f"data.streaming=true with stage={name}: preference data is read into memory "
                "(a KTO row pairs each completion with another record's). Set "
                "data.streaming=false."
            )
        # The preference rows are built by ftlab.data.preference_examples, which has no
        # FlashMask indices, PoSE positions, mixture or generation metric.
        unsupported = [
            (run.model.flash_mask, "model.flash_mask=true", "model.flash_mask=false"),
            (run.data.pose, "data.pose=true", "data.pose=false"),
            (bool(run.data.sources), "data.sources (a mixture)", "one dataset in data.path"),
            (run.eval.generation is True, "eval.generation=true", "eval.generation=false"),
        ]
        for on, setting, instead in unsupported:
            if on:
                raise ConfigError(
                    f"{setting} with stage={name}: the preference rows have no such path "
                    f"(it applies to stage=sft). Use {instead}."
                )

    def derived(self, run: RunConfig) -> dict[str, Any]:
        return {"reference": self.reference(run)}

    # ------------------------------------------------------------------ plan

    def plan(self, run: RunConfig) -> StagePlan:
        reference = self.reference(run)
        return StagePlan(
            reference=reference,
            details={"name": self.name, "reference": reference},
            lines=[f"reference      {REFERENCE_LINES[reference]}"],
        )

    # ------------------------------------------------------------------ data, trainer

    def build_data(self, run: RunConfig, tokenizer: Any) -> Any:
        from ftlab.data.preference_examples import build_preference_data

        return build_preference_data(
            run.data, tokenizer, kind=self.data_kind, seed=run.train.seed, need_dev=True
        )

    def switch_for(self, run: RunConfig, method: Any) -> Any:
        """The adapter switch the trainer uses for its reference (adapter mode only)."""
        return method.set_adapter_enabled if self.reference(run) == REFERENCE_ADAPTER else None
