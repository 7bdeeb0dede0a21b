"""``ftlab mode=export``: the run as an argument file for PaddleNLP's ``llm/run_finetune.py``.

``run_finetune.py <file>.json`` turns every key into ``--key value`` and parses it into
its dataclasses (``ModelConfig``, ``DataConfig``, ``SFTConfig`` from ``paddlenlp.trl``,
plus the script's own ``ReftArgument`` and ``GenerateArgument``); an unknown key is an
error there. So ``run_finetune.json`` holds exactly those keys, and settings the script
cannot express (its LoRA alpha is fixed at ``2 * rank``, or 4 with rsLoRA; its LoRA targets
are every projection; ...) are listed in ``run_finetune_notes.json`` and printed, never
dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftlab.config.schema import LoraMethodConfig, QLoraMethodConfig, RunConfig
from ftlab.errors import ConfigError

# The projections PaddleNLP's get_lora_target_modules adapts on Llama / Qwen2 models.
SCRIPT_LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# ftlab's quant_algo -> PaddleNLP's weight_quantize_algo.
PADDLENLP_QUANT_ALGO = {
    "nf4": "nf4",
    "fp4": "fp4",
    "int8": "weight_only_int8",
    "int4": "weight_only_int4",
}
# Keys read by the script's ReftArgument (defined in llm/utils/argument.py, not the wheel).
REFT_KEYS = ("layers", "position", "intervention_type", "rank", "act_fn", "add_bias", "dropout")


def _training(run: RunConfig, run_dir: Path, notes: list[str]) -> dict[str, Any]:
    t, p, prec = run.train, run.parallel, run.precision
    args: dict[str, Any] = {
        "output_dir": str(run_dir / "run_finetune_output"),
        "per_device_train_batch_size": t.per_device_train_batch_size,
        "per_device_eval_batch_size": t.per_device_eval_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler_type,
        "warmup_steps": t.warmup_steps,
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        "logging_steps": t.logging_steps,
        "do_train": True,
        "do_eval": True,
        "save_strategy": "steps" if t.save_steps else "no",
        "save_total_limit": t.save_total_limit,
        "recompute": t.recompute,
        "unified_checkpoint": True,
        "dataloader_num_workers": t.dataloader_num_workers,
        "use_flash_attention": run.model.flash_attention,
        "tensor_parallel_degree": p.tensor,
        "pipeline_parallel_degree": p.pipeline,
    }
    if t.max_steps > 0:
        args["max_steps"] = t.max_steps
    else:
        args["num_train_epochs"] = t.num_train_epochs
    # PaddleNLP turns evaluation_strategy=no into "every logging_steps" when do_eval is
    # true, so "evaluate at the end" (train.eval_steps=0) is spelled as one interval.
    if t.eval_steps:
        args.update(evaluation_strategy="steps", eval_steps=t.eval_steps)
    elif t.max_steps > 0:
        args.update(evaluation_strategy="steps", eval_steps=t.max_steps)
    else:
        args["evaluation_strategy"] = "epoch"
    if t.save_steps:
        args["save_steps"] = t.save_steps
    if p.tensor > 1:
        args["sequence_parallel"] = p.sequence_parallel
    if p.sharding_stage:
        args["sharding"] = f"stage{p.sharding_stage}" + (" offload" if p.offload else "")
        args["sharding_parallel_degree"] = p.sharding
    if prec.dtype == "bfloat16":
        args.update(bf16=True, fp16_opt_level=prec.amp_level)
    elif prec.dtype == "float16":
        args.update(fp16=True, fp16_opt_level=prec.amp_level)
    if t.eval_steps == 0 and t.max_steps <= 0:
        notes.append(
            "train.eval_steps=0 (evaluate at the end): run_finetune.py evaluates every "
            "epoch (evaluation_strategy=epoch) and once more after training."
        )
    return args


def _data(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    d = run.data
    args: dict[str, Any] = {
        "dataset_name_or_path": d.path,
        "src_length": d.src_length,
        "max_length": d.max_length,
        "zero_padding": d.packing in ("zero_padding", "greedy"),
    }
    if d.packing == "greedy":
        args["greedy_zero_padding"] = True
    if d.chat_template == "tokenizer":
        args["chat_template"] = run.model.name_or_path  # the script's "default loading"
    elif d.chat_template is not None:
        notes.append(
            f"data.chat_template={d.chat_template!r}: run_finetune.py takes a "
            "chat_template.json path; write the template to one and set chat_template."
        )
    if d.train_path or d.dev_path:
        notes.append(
            "data.train_path / data.dev_path: run_finetune.py reads train.json and "
            f"dev.json inside dataset_name_or_path ({d.path}); put the files there."
        )
    if d.format not in ("auto", "src_tgt"):
        notes.append(
            f"data.format={d.format}: run_finetune.py reads src/tgt records; convert "
            "the data first."
        )
    if d.dev_from_train is not None:
        notes.append(
            "data.dev_from_train: run_finetune.py needs a dev.json; write the held-out "
            "records to one."
        )
    if d.overlong != "truncate":
        notes.append(f"data.overlong={d.overlong}: run_finetune.py always truncates.")
    if d.streaming:
        args["lazy"] = True
    return args


def _model(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    m = run.model
    args: dict[str, Any] = {"model_name_or_path": m.name_or_path}
    if m.tokenizer_name_or_path:
        args["tokenizer_name_or_path"] = m.tokenizer_name_or_path
    if run.method.neftune_noise_alpha > 0:
        args.update(neftune=True, neftune_noise_alpha=run.method.neftune_noise_alpha)
        notes.append(
            "NEFTune: run_finetune.py scales the noise by alpha/sqrt(batch*seq_len), "
            "ftlab by alpha/sqrt(seq_len*hidden); the noise magnitudes differ."
        )
    if m.pad_token is not None:
        notes.append(
            f"model.pad_token={m.pad_token!r}: run_finetune.py pads Llama tokenizers "
            "with the eos token instead (padding is masked, losses are unaffected)."
        )
    return args


def _lora(run: RunConfig, m: LoraMethodConfig, notes: list[str]) -> dict[str, Any]:
    from ftlab.methods.lora import lora_alpha, lora_targets

    args: dict[str, Any] = {
        "lora": True,
        "lora_rank": m.lora_rank,
        "rslora": m.rslora,
        "lora_plus_scale": m.lora_plus_scale,
        "pissa": m.pissa,
        "lora_use_mixer": m.lora_use_mixer,
        "use_mora": m.use_mora,
    }
    script_alpha = 4.0 if m.rslora else 2.0 * m.lora_rank
    if lora_alpha(m) != script_alpha:
        notes.append(
            f"method.lora_alpha={lora_alpha(m):g}: run_finetune.py fixes alpha at "
            f"{script_alpha:g} ({'4 with rsLoRA' if m.rslora else '2 x lora_rank'})."
        )
    if m.lora_dropout:
        notes.append(f"method.lora_dropout={m.lora_dropout}: run_finetune.py uses no LoRA dropout.")
    targets = {t.strip(".*") for t in lora_targets(m, run.model)}
    if targets != SCRIPT_LORA_TARGETS:
        notes.append(
            f"LoRA targets {sorted(lora_targets(m, run.model))}: run_finetune.py adapts "
            f"every projection ({', '.join(sorted(SCRIPT_LORA_TARGETS))})."
        )
    return args


def _method(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    m = run.method
    if m.name == "full":
        return {}
    if isinstance(m, QLoraMethodConfig):
        args = _lora(run, m, notes)
        args["weight_quantize_algo"] = PADDLENLP_QUANT_ALGO[m.quant_algo]
        if m.quant_algo in ("nf4", "fp4"):
            args.update(weight_blocksize=m.quant_block_size, weight_double_quant=m.double_quant)
        else:
            notes.append(
                f"method.quant_algo={m.quant_algo}: PaddleNLP quantizes per channel "
                f"(weight_only_*), not in blocks of {m.quant_block_size}."
            )
        notes.append(
            "QLoRA in run_finetune.py runs PaddleNLP's quantized kernels: GPU only, "
            "and nf4/fp4 need PaddleSlim's CUDA ops."
        )
        return args
    if isinstance(m, LoraMethodConfig):
        return _lora(run, m, notes)
    if m.name == "prefix":
        notes.append(
            "prefix tuning: run_finetune.py chooses projection and dropout per model "
            "(get_prefix_tuning_params); method.prefix_projection / prefix_dropout are "
            "not arguments there."
        )
        return {"prefix_tuning": True, "num_prefix_tokens": m.num_prefix_tokens}
    if m.name == "vera":
        notes.append(
            "VeRA: run_finetune.py has only vera_rank; d init, seed, dropout and "
            "targets are its own defaults."
        )
        return {"vera": True, "vera_rank": m.vera_rank}
    if m.name == "lokr":
        notes.append(
            "LoKr: run_finetune.py has only lokr_dim; alpha, factor and "
            "decompose_both are its own defaults."
        )
        return {"lokr": True, "lokr_dim": m.lokr_dim}
    if m.name == "reft":
        layers = "all" if m.reft_layers is None else ";".join(str(x) for x in m.reft_layers)
        return {
            "reft": True,
            "layers": layers,
            "position": m.reft_positions,
            "intervention_type": "LoreftIntervention",
            "rank": m.reft_rank,
            "act_fn": m.reft_act_fn or "linear",
            "dropout": m.reft_dropout,
        }
    raise ConfigError(
        f"mode=export has no run_finetune.py mapping for method={m.name}; it maps full, lora "
        "(and variants), qlora, prefix, vera, lokr and reft. Add one in ftlab/export.py."
    )


def run_finetune_arguments(run: RunConfig, run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(the argument dict run_finetune.py reads, notes on what it cannot express)."""
    notes: list[str] = []
    args = {
        **_model(run, notes),
        **_data(run, notes),
        **_training(run, run_dir, notes),
        **_method(run, notes),
    }
    return {k: v for k, v in args.items() if v is not None}, notes


def export_run_finetune(run: RunConfig, derived: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Write ``run_finetune.json`` (+ notes) into the run dir and print how to run it."""
    args, notes = run_finetune_arguments(run, run_dir)
    path = run_dir / "run_finetune.json"
    path.write_text(json.dumps(args, indent=2) + "\n")
    notes_path = run_dir / "run_finetune_notes.json"
    notes_path.write_text(json.dumps(notes, indent=2) + "\n")
    nproc = derived["nproc_per_node"]
    launcher = (
        f"python -m paddle.distributed.launch --devices {','.join(str(i) for i in range(nproc))} "
        if nproc > 1
        else "python "
    )
    lines = [
        f"wrote {path}",
        f"run it from a PaddleNLP checkout: {launcher}llm/run_finetune.py {path}",
    ]
    if notes:
        lines.append(f"not expressible in run_finetune.py ({notes_path.name}):")
        lines += [f"  - {n}" for n in notes]
    print("\nftlab export\n" + "\n".join("  " + x for x in lines), flush=True)
    return {"run_dir": str(run_dir), "path": str(path), "arguments": args, "notes": notes}
