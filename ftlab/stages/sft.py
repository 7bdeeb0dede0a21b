"""``stage=sft``: supervised fine-tuning, next-token loss on the answers (the default).

Everything here is what ftlab did before stages existed: its data pipeline
(``ftlab.data.build_data``), its Trainer (``FtlabTrainer``, PaddleNLP's ``SFTTrainer``)
and ``run_finetune.py`` for export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import StageConfig
from ftlab.data.formats import FORMATS
from ftlab.errors import ConfigError
from ftlab.models.rope import context_length
from ftlab.stages.registry import Stage, register_stage

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig


@dataclass
class SftStageConfig(StageConfig):
    name: str = "sft"


@register_stage
class Sft(Stage):
    name = "sft"
    schema = SftStageConfig
    data_formats = FORMATS

    def check(self, run: RunConfig, env: Environment) -> None:
        fmt = run.data.format
        if fmt != "auto" and fmt not in self.data_formats:
            raise ConfigError(
                f"data.format={fmt} is preference data; stage=sft trains on answers "
                f"({', '.join(self.data_formats)}). Use stage=dpo (pairs) or stage=kto "
                "(pairs or labelled completions), or SFT data."
            )

    def build_data(self, run: RunConfig, tokenizer: Any) -> Any:
        from ftlab.data.build import build_data

        return build_data(
            run.data,
            tokenizer,
            seed=run.train.seed,
            need_dev=True,  # eval loss and the task metric are part of every summary
            max_steps=run.train.max_steps if run.train.max_steps > 0 else None,
            # PaddleNLP's Trainer shards map and iterable datasets across data-parallel
            # ranks itself; sharding here too would split twice.
            world_size=1,
            rank=0,
            flash_mask=run.model.flash_mask,
            context_length=context_length(run.model),
        )

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        from ftlab.training.trainer import FtlabTrainer

        return FtlabTrainer(**kwargs)
