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

from ftlab.config.derived import Derived
from ftlab.config.schema import RunConfig
from ftlab.errors import ConfigError
from ftlab.methods.catalog import registered_methods
from ftlab.record.rundir import EXPORT, EXPORT_NOTES, RunDir
from ftlab.training.arguments import shared_arguments


def _training(run: RunConfig, run_dir: Path, notes: list[str]) -> dict[str, Any]:
    t, p = run.train, run.parallel
    args: dict[str, Any] = {
        "output_dir": str(run_dir / "run_finetune_output"),
        "do_train": True,
        "do_eval": True,
        "save_strategy": "steps" if t.save_steps else "no",
        "unified_checkpoint": True,
        "use_flash_attention": run.model.flash_attention,
        # The script reads the degrees even when they are 1.
        "tensor_parallel_degree": p.tensor,
        "pipeline_parallel_degree": p.pipeline,
        **shared_arguments(run),
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


def run_finetune_arguments(run: RunConfig, run_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """(the argument dict run_finetune.py reads, notes on what it cannot express)."""
    method = registered_methods().get(run.method.name)
    if method is None:
        raise ConfigError(
            f"mode=export has no run_finetune.py mapping for method={run.method.name}: no such "
            f"method is registered ({', '.join(sorted(registered_methods()))})."
        )
    notes: list[str] = []
    args = {
        **_model(run, notes),
        **_data(run, notes),
        **_training(run, run_dir, notes),
        **method().export(run, notes),
    }
    return {k: v for k, v in args.items() if v is not None}, notes


def export_run_finetune(run: RunConfig, derived: Derived, run_dir: RunDir | Path) -> dict[str, Any]:
    """Write ``run_finetune.json`` (+ notes) into the run dir and print how to run it."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    args, notes = run_finetune_arguments(run, run_dir.path)
    path, notes_path = run_dir / EXPORT, run_dir / EXPORT_NOTES
    run_dir.write_text(EXPORT, json.dumps(args, indent=2) + "\n")
    assumed = [f"assumed: {a}" for a in derived.assumptions or ()]
    run_dir.write_text(EXPORT_NOTES, json.dumps(notes + assumed, indent=2) + "\n")
    nproc = derived.nproc_per_node
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
    if derived.assumptions:
        lines.append("assumed (validated for a described machine, not this one):")
        lines += [f"  - {a}" for a in derived.assumptions]
    print("\nftlab export\n" + "\n".join("  " + x for x in lines), flush=True)
    return {
        "run_dir": str(run_dir),
        "path": str(path),
        "arguments": args,
        "notes": notes,
        "assumptions": list(derived.assumptions or ()),
    }
