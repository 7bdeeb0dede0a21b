"""Export mode: run_finetune.json parses into PaddleNLP's argument dataclasses, key by key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CPU, compose_run, parse_like_run_finetune

from ftlab.errors import ConfigError
from ftlab.interop.paddlenlp_export import export_run_finetune, run_finetune_arguments
from ftlab.resolve.validate import validate


def export(overrides: list[str], tmp_path: Path) -> dict:
    run = compose_run(overrides)
    return export_run_finetune(run, validate(run, CPU), tmp_path)


def test_lora_mapping(tmp_path: Path) -> None:
    out = export(
        [
            "method=lora",
            "method.lora_rank=16",
            "train.max_steps=7",
            "train.per_device_train_batch_size=4",
            "train.gradient_accumulation_steps=2",
            "train.learning_rate=0.001",
            "train.recompute=true",
            "data.packing=greedy",
        ],
        tmp_path,
    )
    args = json.loads((tmp_path / "run_finetune.json").read_text())
    assert args == out["arguments"]
    run = compose_run(["method=lora"])
    assert args["model_name_or_path"] == run.model.name_or_path
    assert args["dataset_name_or_path"] == run.data.path
    assert args["output_dir"] == str(tmp_path / "run_finetune_output")
    expected = {
        "lora": True,
        "lora_rank": 16,
        "rslora": False,
        "max_steps": 7,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 0.001,
        "recompute": True,
        "zero_padding": True,
        "greedy_zero_padding": True,
        "src_length": run.data.src_length,
        "max_length": run.data.max_length,
        "unified_checkpoint": True,
        "tensor_parallel_degree": 1,
        "pipeline_parallel_degree": 1,
        "evaluation_strategy": "steps",
        "eval_steps": 7,
    }
    assert {k: args[k] for k in expected} == expected
    assert "num_train_epochs" not in args and "bf16" not in args and "sharding" not in args
    model_args, data_args, train_args, remaining = parse_like_run_finetune(
        tmp_path / "run_finetune.json"
    )
    assert remaining == []
    assert (model_args.lora, model_args.lora_rank) == (True, 16)
    assert (data_args.zero_padding, data_args.greedy_zero_padding) == (True, True)
    assert (train_args.max_steps, train_args.gradient_accumulation_steps) == (7, 2)
    assert train_args.recompute is True


def test_full_mapping_with_sharding_and_epochs(tmp_path: Path) -> None:
    export(
        [
            "method=full",
            "parallel=sharding_stage1",
            "train.max_steps=-1",
            "train.num_train_epochs=2",
            "train.eval_steps=5",
            "train.save_steps=5",
        ],
        tmp_path,
    )
    args = json.loads((tmp_path / "run_finetune.json").read_text())
    assert not any(k.startswith("lora") or k in ("lora", "prefix_tuning") for k in args)
    assert args["sharding"] == "stage1" and args["sharding_parallel_degree"] == 2
    assert args["num_train_epochs"] == 2 and "max_steps" not in args
    assert (args["evaluation_strategy"], args["eval_steps"]) == ("steps", 5)
    assert (args["save_strategy"], args["save_steps"]) == ("steps", 5)
    model_args, _, train_args, remaining = parse_like_run_finetune(tmp_path / "run_finetune.json")
    assert remaining == [] and model_args.lora is False
    assert train_args.num_train_epochs == 2  # (degrees are re-derived at launch time)


@pytest.mark.fast
def test_settings_the_script_cannot_express_are_listed(tmp_path: Path) -> None:
    out = export(
        [
            "method=lora",
            "method.lora_alpha=4",
            "method.lora_dropout=0.1",
            "method.target_modules=[.*q_proj,.*v_proj]",
        ],
        tmp_path,
    )
    notes = "\n".join(out["notes"])
    assert "lora_alpha=4: run_finetune.py fixes alpha at 16" in notes
    assert "lora_dropout=0.1" in notes and "run_finetune.py adapts 35 layers instead" in notes
    assert json.loads((tmp_path / "run_finetune_notes.json").read_text()) == out["notes"]


@pytest.mark.fast
def test_precision_and_parallel_degrees() -> None:
    run = compose_run(["method=full", "model=llama3", "precision=bf16", "parallel=tp2_sp"])
    args, _ = run_finetune_arguments(run, Path("/r"))
    assert (args["bf16"], args["fp16_opt_level"]) == (True, "O2")
    assert (args["tensor_parallel_degree"], args["sequence_parallel"]) == (2, True)
    run = compose_run(["method=full", "precision=fp16", "parallel=pp2"])
    args, _ = run_finetune_arguments(run, Path("/r"))
    assert (args["fp16"], args["fp16_opt_level"], args["pipeline_parallel_degree"]) == (
        True,
        "O1",
        2,
    )


@pytest.mark.fast
def test_qlora_and_other_methods() -> None:
    args, notes = run_finetune_arguments(
        compose_run(["method=qlora", "method.quant_algo=int8"]), Path("/r")
    )
    assert args["lora"] is True and args["weight_quantize_algo"] == "weight_only_int8"
    assert any("per channel" in n for n in notes)
    args, _ = run_finetune_arguments(compose_run(["method=qlora"]), Path("/r"))
    assert (args["weight_quantize_algo"], args["weight_blocksize"]) == ("nf4", 64)
    args, _ = run_finetune_arguments(compose_run(["method=prefix"]), Path("/r"))
    assert args["prefix_tuning"] is True and args["num_prefix_tokens"] == 16
    args, _ = run_finetune_arguments(compose_run(["method=reft"]), Path("/r"))
    assert (args["reft"], args["layers"], args["position"]) == (True, "all", "f7+l7")


@pytest.mark.fast
def test_unknown_method_is_refused() -> None:
    run = compose_run(["method=full"])
    run.method.name = "unknown"
    with pytest.raises(ConfigError, match="no run_finetune.py mapping for method=unknown"):
        run_finetune_arguments(run, Path("/r"))


def test_cli_export(tmp_path: Path) -> None:
    run_dir = tmp_path / "export"
    proc = subprocess.run(
        [sys.executable, "-m", "ftlab.cli.app", "mode=export", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run_dir / "run_finetune.json").read_text())["lora"] is True
    assert "llm/run_finetune.py" in proc.stdout
