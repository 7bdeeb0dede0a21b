"""``stage=kto``: Kahneman-Tversky Optimization on PaddleNLP's KTOTrainer.

KTO needs no pairs: each completion is labelled desirable or undesirable
(``prompt_completion_label``, or PaddleNLP's ``src_response`` with one response and
``sort`` 1 or 0). Pairs are accepted too: each becomes one desirable (chosen) and one
undesirable (rejected) completion, counted in the data summary (``pairs_split``). The
loss compares each completion's reward ``beta * log(pi / pi_ref)`` with a KL baseline,
estimated per batch from mismatched completions (each row's second response is another
record's completion), weighted by ``stage.desirable_weight`` and
``stage.undesirable_weight``. KTO always needs the reference model.

Reported: ``rewards/chosen`` and ``rewards/rejected`` (mean reward of desirable and of
undesirable completions), ``rewards/margins`` (their difference), ``kl`` (the baseline),
``count/*`` and ``logps/*``, for training intervals and the dev set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import StageConfig
from ftlab.data.preference import LABELLED
from ftlab.errors import ConfigError
from ftlab.interop.preference_export import preference_arguments, script_notes
from ftlab.stages.dpo import check_method_expressible
from ftlab.stages.preference_stage import PreferenceStage
from ftlab.stages.registry import StagePlan, register_stage

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig


@dataclass
class KtoStageConfig(StageConfig):
    name: str = "kto"
    beta: float = 0.1  # the reward is beta * log(pi / pi_ref)
    desirable_weight: float = 1.0  # loss weight of desirable completions
    undesirable_weight: float = 1.0  # loss weight of undesirable completions


@register_stage
class Kto(PreferenceStage):
    name = "kto"
    schema = KtoStageConfig
    data_kind = LABELLED
    data_formats = (
        "src_response",
        "prompt_completion_label",
        "prompt_chosen_rejected",
        "chosen_rejected",
    )
    export_script = "llm/alignment/kto/run_kto.py"
    export_file = "run_kto.json"
    summary_keys = ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl")

    def check(self, run: RunConfig, env: Environment) -> None:
        s = run.stage
        if s.beta <= 0:
            raise ConfigError(f"stage.beta={s.beta}: must be > 0.")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(s, key) <= 0:
                raise ConfigError(f"stage.{key}={getattr(s, key)}: must be > 0.")
        p = run.parallel
        processes = (p.nproc_per_node or 1) * run.launch.nnodes
        hybrid = p.tensor > 1 or p.pipeline > 1 or p.sharding > 1
        if ((p.data or 1) > 1 or processes > 1) and not hybrid:
            # Found by the pairwise matrix (docs/matrix.md): AttributeError at the first step.
            raise ConfigError(
                f"stage=kto with parallel={p.name}: PaddleNLP 3.0.0b4's KTO criterion gathers "
                "its KL term over fleet's hybrid communicate group, which a data-parallel-only "
                "job does not create (it fails before the first step). Use parallel=single."
            )
        super().check(run, env)

    def plan(self, run: RunConfig) -> StagePlan:
        plan = super().plan(run)
        s = run.stage
        plan.details.update(beta=s.beta)
        plan.lines.insert(
            0,
            f"stage          kto, beta {s.beta:g}, weights desirable {s.desirable_weight:g} / "
            f"undesirable {s.undesirable_weight:g}",
        )
        return plan

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        from ftlab.stages.trainers import ClippedKTO, FtlabKTOTrainer, PaddleKTOConfig

        s = run.stage
        switch = self.switch_for(run, method)
        config = PaddleKTOConfig(
            beta=s.beta,
            desirable_weight=s.desirable_weight,
            undesirable_weight=s.undesirable_weight,
            lora=switch is not None,
        )
        criterion = ClippedKTO(kwargs["model"].config, kto_config=config, ignore_label=0)
        return FtlabKTOTrainer(
            kto_config=config,
            ref_model=reference_model,
            kto_criterion=criterion,
            switch_adapter=switch,
            **kwargs,
        )

    def export(self, run: RunConfig, args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        s = run.stage
        check_method_expressible(run, self.export_script)
        loss_args = {
            "beta": s.beta,
            "desirable_weight": s.desirable_weight,
            "undesirable_weight": s.undesirable_weight,
        }
        notes[:] = script_notes(notes, self.export_script)
        notes.append(
            "run_kto.py reads PaddleNLP's labelled records (src, tgt, response: [one answer], "
            "sort: [1 desirable | 0 undesirable]); other preference formats, and pairs, need "
            "converting (a pair becomes one record of each label). Its KL completion for "
            "record i is record -i's (its own for the first); ftlab takes record i+1's, and "
            "clips the KL estimate at 0 on one process as on several."
        )
        return preference_arguments(run, self.export_script, "kto", args, loss_args, notes)
