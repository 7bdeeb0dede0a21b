"""``stage=rm``: a reward model, the causal LM with a scalar head, on preference pairs.

Reads the preference formats DPO reads (``src_response``, ``prompt_chosen_rejected``,
``chosen_rejected``; the shipped ``demo_preferences``) and trains a Bradley-Terry loss,
``-log sigmoid(r_chosen - r_rejected)`` (``ftlab.stages.rm_trainer``). No reference model.
Reported for training intervals and the dev set: ``rewards/accuracies`` (share of pairs
whose chosen response scores higher), ``rewards/margins`` (mean difference),
``rewards/chosen`` and ``rewards/rejected``. A finished run is a reward for GRPO:
``stage.rewards=[rm:RUN_DIR]`` (``ftlab.stages.rewards``).

PaddleNLP's ``llm/alignment/rm`` scripts are not in its wheel and train their own models;
``mode=export`` is refused for this stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import StageConfig
from ftlab.data.preference import PAIRWISE
from ftlab.errors import ConfigError
from ftlab.stages.preference_stage import PreferenceStage
from ftlab.stages.registry import StagePlan, process_count, register_stage

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig


@dataclass
class RmStageConfig(StageConfig):
    name: str = "rm"


@register_stage
class Rm(PreferenceStage):
    name = "rm"
    schema = RmStageConfig
    data_kind = PAIRWISE
    data_formats = ("src_response", "prompt_chosen_rejected", "chosen_rejected")
    # Not run_finetune.json, so that export asks this stage (which refuses).
    export_script = "llm/alignment/rm"
    export_file = "run_reward.json"
    summary_keys = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    def needs_reference(self, run: RunConfig) -> bool:
        return False

    def check(self, run: RunConfig, env: Environment) -> None:
        super().check(run, env)
        p = run.parallel
        if process_count(run) > 1:
            raise ConfigError(
                f"stage=rm with parallel={p.name}: the reward head is checked on one process "
                "only. Use parallel=single."
            )

    def plan(self, run: RunConfig) -> StagePlan:
        plan = super().plan(run)
        plan.lines.insert(0, "stage          rm, Bradley-Terry loss, scalar head (hidden -> 1)")
        return plan

    def export(self, run: RunConfig, args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        raise ConfigError(
            "mode=export with stage=rm: PaddleNLP's run_finetune.py trains no reward model and "
            "its llm/alignment/rm scripts build their own models; train it with ftlab."
        )

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        from ftlab.stages.rm_trainer import RewardModelTrainer, attach_head

        head = attach_head(kwargs["model"], run.train.seed)
        return RewardModelTrainer(head=head, **kwargs)
