"""``ftlab-import``: PaddleNLP run_finetune.py argument files in, the same values out again.

The argument files below are written in the format of PaddleNLP's
``llm/config/<model>/*_argument.json`` (the SFT, LoRA, QLoRA and prefix files of
``llm/config/llama`` with their keys and values, plus a tensor x pipeline layout). Round
trip: import, compose the printed command, ``mode=export``, and every key both sides
express comes back with the value run_finetune.py would have used (the file's, else
PaddleNLP's default).
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import CONF_DIR, compose_run

from ftlab.cli.importer import command_overrides, main, override_value
from ftlab.config.environment import target_environment
from ftlab.interop.paddlenlp_export import run_finetune_arguments
from ftlab.interop.paddlenlp_import import import_arguments, script_defaults
from ftlab.resolve.validate import validate

COMMON = {
    "model_name_or_path": "meta-llama/Meta-Llama-3-8B",
    "dataset_name_or_path": "./data",
    "per_device_eval_batch_size": 8,
    "eval_accumulation_steps": 16,
    "num_train_epochs": 3,
    "warmup_steps": 30,
    "logging_steps": 1,
    "evaluation_strategy": "epoch",
    "save_strategy": "epoch",
    "src_length": 1024,
    "max_length": 2048,
    "bf16": True,
    "fp16_opt_level": "O2",
    "do_train": True,
    "do_eval": True,
    "disable_tqdm": True,
    "load_best_model_at_end": True,
    "eval_with_do_generation": False,
    "metric_for_best_model": "accuracy",
    "save_total_limit": 1,
    "tensor_parallel_degree": 1,
    "pipeline_parallel_degree": 1,
    "zero_padding": False,
    "unified_checkpoint": True,
}
FILES: dict[str, dict[str, Any]] = {
    "sft": {
        **COMMON,
        "output_dir": "./checkpoints/llama_sft_ckpts",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 2,
        "learning_rate": 3e-05,
        "recompute": False,
        "pipeline_parallel_config": "disable_p2p_cache_shape",
        "sharding": "stage2",
        "use_flash_attention": False,
    },
    "lora": {
        **COMMON,
        "output_dir": "./checkpoints/lora_ckpts",
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 3e-04,
        "evaluation_strategy": "steps",
        "save_strategy": "steps",
        "save_steps": 1,
        "do_eval": False,
        "recompute": True,
        "sharding": "stage1",
        "lora": True,
        "use_flash_attention": True,
        "pissa": False,
    },
    "qlora": {
        **COMMON,
        "output_dir": "./checkpoints/lora_ckpts",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "learning_rate": 3e-04,
        "recompute": True,
        "lora": True,
        "use_flash_attention": False,
        "weight_quantize_algo": "nf4",
    },
    "prefix": {
        **COMMON,
        "output_dir": "./checkpoints/pt_ckpts",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "learning_rate": 3e-02,
        "recompute": True,
        "prefix_tuning": True,
        "use_flash_attention": True,
    },
    "tensor_parallel": {
        **COMMON,
        "output_dir": "./checkpoints/lora_tp_ckpts",
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 8,
        "learning_rate": 1e-04,
        "max_steps": 500,
        "evaluation_strategy": "steps",
        "eval_steps": 100,
        "save_strategy": "steps",
        "save_steps": 250,
        "recompute": True,
        "tensor_parallel_degree": 4,
        "pipeline_parallel_degree": 2,
        "sequence_parallel": True,
        "lora": True,
        "lora_rank": 16,
        "zero_padding": True,
        "greedy_zero_padding": True,
        "use_flash_attention": True,
    },
}
EXPECTED = {  # file -> (group options, keys listed as not expressible)
    "sft": (
        {"method": "full", "parallel": "sharding_stage2", "precision": "bf16"},
        {"output_dir", "eval_accumulation_steps", "disable_tqdm", "load_best_model_at_end"}
        | {"metric_for_best_model", "save_strategy", "pipeline_parallel_config"},
    ),
    "lora": (
        {"method": "lora", "parallel": "sharding_stage1", "precision": "bf16"},
        {"output_dir", "eval_accumulation_steps", "disable_tqdm", "load_best_model_at_end"}
        | {"metric_for_best_model", "do_eval"},
    ),
    "qlora": (
        {"method": "qlora", "parallel": "single", "precision": "bf16"},
        {"output_dir", "eval_accumulation_steps", "disable_tqdm", "load_best_model_at_end"}
        | {"metric_for_best_model", "save_strategy"},
    ),
    "prefix": (
        {"method": "prefix", "parallel": "single", "precision": "bf16"},
        {"output_dir", "eval_accumulation_steps", "disable_tqdm", "load_best_model_at_end"}
        | {"metric_for_best_model", "save_strategy"},
    ),
    "tensor_parallel": (
        {"method": "lora", "parallel": "tp4_pp2", "precision": "bf16"},
        {"output_dir", "eval_accumulation_steps", "disable_tqdm", "load_best_model_at_end"}
        | {"metric_for_best_model"},
    ),
}


@functools.cache
def defaults() -> dict[str, Any]:
    return script_defaults()


def effective(source: dict[str, Any], key: str) -> Any:
    """The value run_finetune.py would use for ``key``."""
    args = {**defaults(), **source}
    if key == "eval_steps" and args.get("evaluation_strategy") == "steps":
        return args.get("eval_steps") or args.get("logging_steps")
    if key in ("tensor_parallel_degree", "pipeline_parallel_degree"):
        return max(args[key], 1)
    return args[key]


@pytest.mark.parametrize("name", list(FILES))
def test_import_then_export_gives_back_every_expressed_value(name: str) -> None:
    source = FILES[name]
    imported = import_arguments(source, CONF_DIR, defaults())
    choices, unsupported = EXPECTED[name]
    assert {g: imported.choices[g] for g in choices} == choices
    assert imported.choices["model"] == "llama3"
    assert set(imported.unsupported) == unsupported
    # Every key of the file is accounted for, once.
    parts = [set(imported.expressed), set(imported.at_default), set(imported.unsupported)]
    assert sum(map(len, parts)) == len(source) and set().union(*parts) == set(source)

    overrides = command_overrides(imported, CONF_DIR)
    run = compose_run([*overrides, "mode=export", "device=gpu"])
    validate(run, target_environment(run))
    exported, _ = run_finetune_arguments(run, Path("/run"))
    # Keys the export writes that the file left at PaddleNLP's default come back too.
    compared = [k for k in exported if k in imported.expressed]
    compared += [
        k
        for k in exported
        if k not in source and k in defaults() and k not in imported.default_gaps
    ]
    if "sharding_parallel_degree" not in source:  # the import says what it assumed
        compared = [k for k in compared if k != "sharding_parallel_degree"]
        if exported.get("sharding"):
            assert any("sharding_parallel_degree is not set" in n for n in imported.notes)
    assert "learning_rate" in compared and "model_name_or_path" in compared
    mismatched = {
        k: (exported[k], effective(source, k))
        for k in compared
        if exported[k] != effective(source, k)
    }
    assert not mismatched, mismatched


def test_method_settings_come_back() -> None:
    run = compose_run(
        command_overrides(
            import_arguments(FILES["tensor_parallel"], CONF_DIR, defaults()), CONF_DIR
        )
    )
    assert (run.method.name, run.method.lora_rank, run.data.packing) == ("lora", 16, "greedy")
    assert (run.parallel.tensor, run.parallel.pipeline, run.parallel.sequence_parallel) == (
        4,
        2,
        True,
    )
    assert (run.train.max_steps, run.train.eval_steps, run.train.save_steps) == (500, 100, 250)
    run = compose_run(
        command_overrides(import_arguments(FILES["prefix"], CONF_DIR, defaults()), CONF_DIR)
    )
    assert run.method.num_prefix_tokens == defaults()["num_prefix_tokens"]  # PaddleNLP's 128
    assert (run.train.max_steps, run.train.num_train_epochs, run.train.eval_steps) == (-1, 3.0, 0)
    qlora = import_arguments(
        {**FILES["lora"], "weight_quantize_algo": "weight_only_int8"}, CONF_DIR, defaults()
    )
    assert qlora.choices["method"] == "qlora" and qlora.settings["method.quant_algo"] == "int8"
    rslora = import_arguments({**FILES["lora"], "rslora": True}, CONF_DIR, defaults())
    assert rslora.settings["method.lora_alpha"] == 4.0  # run_finetune.py's fixed alpha
    base = {k: v for k, v in FILES["sft"].items() if k != "sharding"}
    for extra, method, settings in (
        ({"vera": True, "vera_rank": 4}, "vera", {"method.vera_rank": 4}),
        ({"lokr": True, "lokr_dim": 16}, "lokr", {"method.lokr_dim": 16}),
        (
            {"reft": True, "layers": "0;1", "rank": 2, "position": "f3+l3", "act_fn": "linear"},
            "reft",
            {"method.reft_layers": [0, 1], "method.reft_rank": 2, "method.reft_act_fn": None},
        ),
    ):
        imported = import_arguments({**base, **extra}, CONF_DIR, defaults())
        assert imported.choices["method"] == method and not set(extra) & set(imported.unsupported)
        assert {k: imported.settings[k] for k in settings} == settings


def test_unknown_model_and_unknown_keys_are_said(tmp_path: Path) -> None:
    known = import_arguments(
        {**FILES["lora"], "model_name_or_path": "Qwen/Qwen2.5-0.5B"}, CONF_DIR, defaults()
    )
    assert known.choices["model"] == "qwen2_5_0_5b"
    assert "model.name_or_path" not in known.settings
    imported = import_arguments(
        {**FILES["lora"], "model_name_or_path": "Qwen/Qwen2.5-3B", "my_flag": 3},
        CONF_DIR,
        defaults(),
    )
    option = imported.choices["model"]
    assert option.startswith("qwen2")
    assert imported.settings["model.name_or_path"] == "Qwen/Qwen2.5-3B"
    assert any(f"architecture numbers of model={option}" in n for n in imported.notes)
    assert imported.unsupported["my_flag"] == "no ftlab setting"
    # A local checkpoint: its config.json gives the architecture.
    local = tmp_path / "tiny"
    shutil.copytree(Path(__file__).parents[1] / "ftlab" / "assets" / "stories260k", local)
    imported = import_arguments(
        {**FILES["lora"], "model_name_or_path": str(local)}, CONF_DIR, defaults()
    )
    # ftlab reads the directory's config.json itself: no model.arch override is needed.
    assert not any(k.startswith("model.arch.") for k in imported.settings)
    assert imported.settings["model.name_or_path"] == str(local)
    assert imported.settings["model.name"] == "tiny"
    assert any("reads its family and model.arch from its config.json" in n for n in imported.notes)


@pytest.mark.fast
def test_override_values_parse_back() -> None:
    assert override_value("./data") == "./data"
    assert override_value("a b") == "'a b'"
    assert override_value("true") == "'true'" and override_value(True) == "true"
    assert override_value(3e-4) == "0.0003" and override_value(None) == "null"
    assert override_value([".*q_proj", ".*v_proj"]) == "[.*q_proj,.*v_proj]"


def test_cli_prints_the_command_and_saves_an_experiment(tmp_path: Path, capsys) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    path = tmp_path / "lora_argument.json"
    path.write_text(json.dumps(FILES["lora"], indent=4))
    main([str(path), "--save", "imported_lora", "--conf-dir", str(conf)])
    out = capsys.readouterr().out
    command = out.splitlines()[1].split()
    assert command[:6] == [
        "ftlab",
        "model=llama3",
        "method=lora",
        "data=advertisegen",
        "parallel=sharding_stage1",
        "precision=bf16",
    ]
    assert "not expressible in ftlab (6 keys):" in out
    assert "  - output_dir='./checkpoints/lora_ckpts': ftlab writes everything" in out
    saved = conf / "experiment" / "imported_lora.yaml"
    assert saved.is_file() and "wrote" in out
    # The experiment composes to the same run as the printed command.
    from hydra import compose, initialize_config_dir

    from ftlab.resolve.compose import to_run_config

    with initialize_config_dir(str(conf), version_base="1.3"):
        via_experiment = to_run_config(compose("train", overrides=["experiment=imported_lora"]))
    assert via_experiment == compose_run(command[1:])
    with pytest.raises(SystemExit):
        main([str(path), "--save", "imported_lora", "--conf-dir", str(conf)])  # exists
    assert "pass --force" in capsys.readouterr().err
