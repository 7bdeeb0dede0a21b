"""Full-parameter fine-tuning: every weight trains; the saved artefact is the whole model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.methods.registry import AdapterPlan, Method, register_method

if TYPE_CHECKING:
    import paddle

    from ftlab.config.schema import ModelConfig, RunConfig


@dataclass
class FullMethodConfig(MethodConfig):
    name: str = "full"


@register_method
class Full(Method):
    name = "full"
    schema = FullMethodConfig
    supports_pipeline_parallel = True
    saves_whole_model = True

    def plan(self, run: RunConfig) -> AdapterPlan:
        return AdapterPlan(trains_base=True)

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        return {}  # run_finetune.py fine-tunes every weight unless a PEFT flag is set

    def import_arguments(
        self, args: Mapping[str, Any], model: ModelConfig, notes: list[str]
    ) -> tuple[dict[str, Any], set[str]] | None:
        return {}, set()  # selected when no PEFT method reads more of the file

    def apply(
        self, model: paddle.nn.Layer, cfg: FullMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        for p in model.parameters():
            p.stop_gradient = False
        return model

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: FullMethodConfig | None
    ) -> paddle.nn.Layer:
        from paddlenlp.transformers import AutoModelForCausalLM

        # The trained directory is a complete model: the base is not needed.
        return AutoModelForCausalLM.from_pretrained(str(trained_dir), dtype=base.config.dtype)

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        return model
