"""Preference stages in ``mode=export`` and ``mode=plan``.

The argument files are parsed as PaddleNLP's ``run_dpo.py`` / ``run_kto.py`` parse them:
``PdArgumentParser`` over four dataclasses. Those dataclasses live in PaddleNLP's
``llm/alignment`` scripts, not in the wheel; they are restated below field by field from
``llm/alignment/dpo/dpo_argument.py`` (commit 9f438b8) and ``llm/alignment/kto/
kto_argument.py`` (ef2ffc3), the versions whose training arguments use the wheel's
``llmmetaclass``. An unknown key would come back in the parser's remaining strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import pytest
from helpers import CPU, GPU8, compose_run

from ftlab.errors import ConfigError
from ftlab.interop.paddlenlp_export import export_run_finetune
from ftlab.planning.plan import make_plan
from ftlab.resolve.validate import validate


def upstream_dataclasses(kind: str) -> tuple:
    from paddlenlp.trainer import TrainingArguments
    from paddlenlp.transformers.configuration_utils import llmmetaclass

    @dataclass
    @llmmetaclass
    class ScriptTrainingArguments(TrainingArguments):
        unified_checkpoint: bool = field(default=True)
        unified_checkpoint_config: Optional[str] = field(default="")  # noqa: UP045
        autotuner_benchmark: bool = field(default=False)
        benchmark: bool = field(default=False)

    @dataclass
    class ModelArgument:
        model_name_or_path: str = field(default=None)
        tokenizer_name_or_path: Optional[str] = field(default=None)  # noqa: UP045
        flash_mask: bool = field(default=False)
        weight_quantize_algo: str = field(default=None)
        fuse_attention_qkv: bool = field(default=None)
        fuse_attention_ffn: bool = field(default=None)
        lora_rank: int = field(default=8)
        lora_path: str = field(default=None)
        rslora: bool = field(default=False)
        lora_plus_scale: float = field(default=1.0)
        lora_alpha: int = field(default=-1)
        rslora_plus: bool = field(default=False)
        use_quick_lora: bool = field(default=True)

    @dataclass
    class DataArgument:
        train_dataset_path: str = field(default="./data/train.jsonl")
        dev_dataset_path: str = field(default="./data/dev.jsonl")
        max_seq_len: int = field(default=4096)
        max_prompt_len: int = field(default=2048)
        greedy_zero_padding: bool = field(default=False)

    @dataclass
    class DPODataArgument(DataArgument):
        lazy: bool = field(default=False)

    @dataclass
    class DPOConfig:
        beta: float = field(default=0.1)
        simpo_gamma: float = field(default=0.5)
        label_smoothing: float = field(default=0.0)
        loss_type: str = field(default="sigmoid")
        pref_loss_ratio: float = field(default=1.0)
        sft_loss_ratio: float = field(default=0.0)
        dpop_lambda: float = field(default=50)
        ref_model_update_steps: int = field(default=-1)
        reference_free: bool = field(default=False)
        lora: bool = field(default=False)

    @dataclass
    class KTOConfig:
        beta: float = field(default=0.1)
        desirable_weight: float = field(default=1.0)
        undesirable_weight: float = field(default=1.0)
        lora: bool = field(default=False)

    if kind == "dpo":
        return ModelArgument, DPODataArgument, ScriptTrainingArguments, DPOConfig
    return ModelArgument, DataArgument, ScriptTrainingArguments, KTOConfig


def parse_like_the_script(path: Path, kind: str) -> tuple:
    from paddlenlp.trainer import PdArgumentParser

    parser = PdArgumentParser(upstream_dataclasses(kind))
    return parser.parse_json_file(str(path), return_remaining_strings=True)


def export(overrides: list[str], tmp_path: Path) -> dict[str, Any]:
    run = compose_run(overrides)
    return export_run_finetune(run, validate(run, CPU), tmp_path)


def test_dpo_lora_export_parses_as_run_dpo_reads_it(tmp_path: Path) -> None:
    out = export(["stage=dpo", "stage.loss_type=ipo", "stage.beta=0.2"], tmp_path)
    path = tmp_path / "run_dpo.json"
    assert json.loads(path.read_text()) == out["arguments"]
    assert json.loads((tmp_path / "run_dpo_notes.json").read_text()) == out["notes"]
    model, data, train, dpo, remaining = parse_like_the_script(path, "dpo")
    assert remaining == []
    assert (dpo.loss_type, dpo.beta, dpo.lora, dpo.reference_free) == ("ipo", 0.2, True, False)
    assert model.lora_rank == 8
    assert data.train_dataset_path.endswith("demo_preferences/train.json")
    assert data.dev_dataset_path.endswith("demo_preferences/dev.json")
    assert (data.max_seq_len, data.max_prompt_len) == (256, 64)
    assert (train.max_steps, train.per_device_train_batch_size, train.learning_rate) == (
        30,
        8,
        3e-4,
    )
    assert train.output_dir == str(tmp_path / "run_dpo_output")
    notes = "\n".join(out["notes"])
    assert "run_dpo.py always packs" in notes and "run_finetune.py" not in notes


def test_orpo_and_full_finetuning_export(tmp_path: Path) -> None:
    out = export(["stage=dpo", "stage.loss_type=orpo", "method=full"], tmp_path)
    _, _, _, dpo, remaining = parse_like_the_script(tmp_path / "run_dpo.json", "dpo")
    assert remaining == [] and "lora" not in out["arguments"]
    # run_dpo.py itself turns orpo into "or" + reference_free + sft_loss_ratio 1.
    assert (dpo.loss_type, dpo.reference_free, dpo.sft_loss_ratio) == ("orpo", True, 1.0)


def test_kto_export_parses_as_run_kto_reads_it(tmp_path: Path) -> None:
    out = export(["stage=kto", "stage.undesirable_weight=1.5"], tmp_path)
    _, data, _, kto, remaining = parse_like_the_script(tmp_path / "run_kto.json", "kto")
    assert remaining == []
    assert (kto.undesirable_weight, kto.lora) == (1.5, True)
    assert any("run_kto.py reads PaddleNLP's labelled records" in n for n in out["notes"])


@pytest.mark.fast
def test_methods_the_scripts_lack_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="run_dpo.py trains full models and LoRA .* no vera"):
        export(["stage=dpo", "method=vera"], tmp_path)
    with pytest.raises(ConfigError, match="no pissa"):
        export(["stage=dpo", "method.pissa=true"], tmp_path)


@pytest.mark.fast
def test_plan_counts_the_reference_copy_only_when_one_is_held() -> None:
    def plan(overrides: list[str]) -> dict[str, Any]:
        run = compose_run(["model=llama3", "device=gpu", "precision=bf16", *overrides])
        return make_plan(run, validate(run, GPU8), "gpu")

    full_sft, full_dpo = plan(["method=full"]), plan(["method=full", "stage=dpo"])
    lora_dpo, simpo = plan(["stage=dpo"]), plan(["stage=dpo", "stage.loss_type=simpo"])
    mem = full_dpo["memory_bytes"]
    assert mem["reference"] == mem["weights"]  # a bf16 copy of the 8B model
    assert mem["reference"] == pytest.approx(8_030_261_248 * 2)
    # Beyond the reference, the stages differ only in their batches' activations and logits
    # (a DPO micro-batch holds pairs; the GPU plan counts the fp32 logits and loss).
    sft_mem = full_sft["memory_bytes"]
    assert mem["total"] - mem["reference"] == pytest.approx(
        sft_mem["total"]
        + (mem["activations"] - sft_mem["activations"])
        + (mem["logits"] - sft_mem["logits"])
    )
    assert full_sft["memory_bytes"]["reference"] == 0
    assert lora_dpo["memory_bytes"]["reference"] == 0 and simpo["memory_bytes"]["reference"] == 0
    assert full_dpo["stage"] == {
        "name": "dpo",
        "reference": "copy",
        "loss_type": "sigmoid",
        "beta": 0.5,
    }
    assert any("adapter switched off" in line for line in lora_dpo["method_lines"])
