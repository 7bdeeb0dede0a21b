"""``ftlab mode=export``: the run as an argument file for PaddleNLP's ``llm/run_finetune.py``.

``run_finetune.py <file>.json`` turns every key into ``--key value`` and parses it into
its dataclasses (``ModelConfig``, ``DataConfig``, ``SFTConfig`` from ``paddlenlp.trl``,
plus the script's own ``ReftArgument`` and ``GenerateArgument``); an unknown key is an
error there. So ``run_finetune.json`` holds exactly those keys, and settings the script
cannot express (its LoRA alpha is fixed at ``2 * rank``, or 4 with rsLoRA; its LoRA targets
are every projection; ...) are listed in ``run_finetune_notes.json`` and printed, never
dropped silently. A preference stage turns this mapping into the argument file of its own
PaddleNLP script (``Stage.export``: ``run_dpo.json``, ``run_kto.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftlab.config.derived import Derived
from ftlab.config.schema import RunConfig, TrainSettings
from ftlab.data.formats import TEXT_FORMATS
from ftlab.errors import ConfigError
from ftlab.methods.catalog import registered_methods
from ftlab.models.rope import STRATEGIES, STRATEGY_TYPE
from ftlab.record.rundir import EXPORT, EXPORT_NOTES, RunDir
from ftlab.resolve.validate import generation_enabled
from ftlab.stages.catalog import get_stage
from ftlab.training.arguments import setting, shared_arguments

# run_finetune.py keys that carry one ftlab setting unchanged (key -> dotted setting),
# beside ``training.arguments.TRAIN_KEYS``: the export writes them, ``ftlab-import`` reads
# them back. The keys below this table are spelled differently on each side and have a
# function per direction here.
SCRIPT_KEYS: dict[str, str] = {
    "model_name_or_path": "model.name_or_path",
    "tokenizer_name_or_path": "model.tokenizer_name_or_path",
    "dataset_name_or_path": "data.path",
    "src_length": "data.src_length",
    "max_length": "data.max_length",
    "use_flash_attention": "model.flash_attention",
    "lazy": "data.streaming",
}
# The ones among them that belong to the model (a preference script's argument file too).
MODEL_KEYS = {k for k, dotted in SCRIPT_KEYS.items() if dotted.startswith("model.")}
# Keys the script needs whatever the run: ftlab always trains, evaluates at the end and
# saves unified checkpoints.
FIXED_KEYS: dict[str, Any] = {"do_train": True, "do_eval": True, "unified_checkpoint": True}


def _script_keys(run: RunConfig) -> dict[str, Any]:
    return {key: setting(run, dotted) for key, dotted in SCRIPT_KEYS.items()}


def packing_arguments(packing: str) -> dict[str, Any]:
    args: dict[str, Any] = {"zero_padding": packing in ("zero_padding", "greedy")}
    if packing == "greedy":
        args["greedy_zero_padding"] = True
    return args


def packing_from_arguments(args: dict[str, Any]) -> str:
    if not args.get("zero_padding"):
        return "none"
    return "greedy" if args.get("greedy_zero_padding") else "zero_padding"


def schedule_arguments(t: TrainSettings) -> dict[str, Any]:
    """Length, evaluation and checkpoint cadence, as run_finetune.py spells them."""
    args: dict[str, Any] = {"save_strategy": "steps" if t.save_steps else "no"}
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
    return args


def schedule_from_arguments(args: dict[str, Any], unsupported: dict[str, str]) -> dict[str, Any]:
    """The inverse of ``schedule_arguments``: ``train.*`` settings; what ftlab cannot do
    goes to ``unsupported`` (key -> why)."""
    max_steps = int(args.get("max_steps") or -1)
    out: dict[str, Any] = {"train.max_steps": max_steps if max_steps > 0 else -1}
    if max_steps <= 0:
        out["train.num_train_epochs"] = float(args.get("num_train_epochs", 1.0))
    strategy = str(args.get("evaluation_strategy") or "no")
    eval_steps = args.get("eval_steps") or args.get("logging_steps")
    if strategy == "steps":
        out["train.eval_steps"] = 0 if eval_steps == max_steps else int(eval_steps)
    else:
        out["train.eval_steps"] = 0
        if strategy != "epoch" or max_steps > 0:
            unsupported["evaluation_strategy"] = (
                "ftlab evaluates every train.eval_steps and always at the end"
            )
    save = str(args.get("save_strategy") or "steps")
    out["train.save_steps"] = int(args.get("save_steps", 500)) if save == "steps" else 0
    if save == "epoch":
        unsupported["save_strategy"] = (
            "ftlab checkpoints every train.save_steps (0: once, at the end), not per epoch"
        )
    return out


def _training(run: RunConfig, run_dir: Path, notes: list[str]) -> dict[str, Any]:
    t, p = run.train, run.parallel
    args: dict[str, Any] = {
        "output_dir": str(run_dir / "run_finetune_output"),
        **FIXED_KEYS,
        # The script reads the degrees even when they are 1.
        "tensor_parallel_degree": p.tensor,
        "pipeline_parallel_degree": p.pipeline,
        **shared_arguments(run),
        **schedule_arguments(t),
    }
    if t.eval_steps == 0 and t.max_steps <= 0:
        notes.append(
            "train.eval_steps=0 (evaluate at the end): run_finetune.py evaluates every "
            "epoch (evaluation_strategy=epoch) and once more after training."
        )
    return args


def _data(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    d = run.data
    args: dict[str, Any] = packing_arguments(d.packing)
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
    if d.format in TEXT_FORMATS:
        args.update(_text_data(run, notes))
    elif d.format not in ("auto", "src_tgt"):
        notes.append(
            f"data.format={d.format}: run_finetune.py reads src/tgt records; convert "
            "the data first."
        )
    if d.pose:
        args["use_pose_convert"] = True
        notes.append(
            "data.pose=true: run_finetune.py's PoSE cuts two chunks out of one longer "
            "document (dropping the text between them) and spreads positions over "
            "max_length x rope_scaling_factor; ftlab keeps each row's text contiguous and "
            "spreads its positions over the scaled context (model.arch."
            "max_position_embeddings x factor)."
        )
    if d.dev_from_train is not None:
        notes.append(
            "data.dev_from_train: run_finetune.py needs a dev.json; write the held-out "
            "records to one."
        )
    if d.overlong != "truncate":
        notes.append(f"data.overlong={d.overlong}: run_finetune.py always truncates.")
    if d.sources:
        first = d.sources[0].path
        args["dataset_name_or_path"] = first
        mix = ", ".join(f"{s.path} x {s.weight:g}" for s in d.sources)
        notes.append(
            f"data.sources (a weighted mixture: {mix}): run_finetune.py reads one dataset; "
            f"dataset_name_or_path is set to the first source ({first}). Mix the sources "
            "into one train.json / dev.json by weight first and point it there."
        )
    return args


def _evaluation(run: RunConfig, generation: bool, notes: list[str]) -> dict[str, Any]:
    """Generation metrics: run_finetune.py's eval_with_do_generation (DataConfig keys)."""
    if not generation:
        return {}
    e = run.eval
    notes.append(
        "eval.generation=true: with eval_with_do_generation run_finetune.py scores BLEU-4 and "
        "ROUGE-1/2/L instead of the eval loss at every evaluation, generating with its "
        "GenerateArgument (top_k=1 by default, i.e. greedy; set top_k / top_p in this file "
        f"to sample) and its own length limits; ftlab scores the base and the fine-tuned "
        f"model once at the end, {e.decode_strategy}, max_new_tokens={e.max_new_tokens}."
    )
    if e.metric_tokens == "word":
        notes.append(
            "eval.metric_tokens=word: run_finetune.py always scores characters (it passes the "
            "decoded strings to paddlenlp.metrics), so its numbers for English text differ."
        )
    return {"eval_with_do_generation": True, "save_generation_output": True}


def _trainer_notes(run: RunConfig, notes: list[str]) -> None:
    t = run.train
    if "wandb" in t.report_to:
        notes.append(
            "train.report_to has wandb: ftlab records an offline run in the run dir; "
            "run_finetune.py's callback logs online unless WANDB_MODE=offline is set."
        )
    if "mlflow" in t.report_to:
        notes.append(
            "train.report_to has mlflow: PaddleNLP has no MLflow callback, so report_to "
            "leaves it out; run_finetune.py's metrics reach MLflow only through ftlab."
        )
    if t.early_stopping_patience > 0:
        notes.append(
            f"train.early_stopping_patience={t.early_stopping_patience} (threshold "
            f"{t.early_stopping_threshold:g}): run_finetune.py has no early-stopping argument; "
            "add PaddleNLP's EarlyStoppingCallback to its Trainer to stop the same way."
        )
    if t.optim == "adamw_mini":
        notes.append(
            "train.optim=adamw_mini: ftlab's update uses the current first moment; PaddleNLP "
            "3.0.0b4's AdamWMini applies the previous step's (its first step changes nothing), "
            "so run_finetune.py trains differently."
        )


def _text_data(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    """PaddleNLP's unsupervised mode (``autoregressive``) for the text formats."""
    d = run.data
    if d.format == "text":
        notes.append(
            'data.format=text: run_finetune.py\'s autoregressive mode reads {"src": ...} '
            'records; rename each record\'s "text" field to "src" (or use '
            "data.format=autoregressive)."
        )
    notes.append(
        f"data.format={d.format} (data.packing={d.packing}): run_finetune.py tokenizes each "
        "document as one example (its last input token replaced by eos) and its zero "
        "padding skips examples longer than max_length; ftlab cuts documents into rows of "
        "max_length, losing nothing (packing none / zero_padding: the concatenated stream in "
        "blocks, zero_padding with per-document masks; greedy: a document only when longer "
        "than a row)."
    )
    return {"autoregressive": True}


def _long_sequence_model(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    """FlashMask and RoPE-scaling keys of run_finetune.py's ModelConfig."""
    m = run.model
    args: dict[str, Any] = {}
    if m.flash_mask:
        args["flash_mask"] = True
    rs = m.rope_scaling
    if rs.strategy is None:
        return args
    args.update(
        use_long_sequence_strategies=True,
        strategy_type=STRATEGY_TYPE,
        strategy_name=STRATEGIES[rs.strategy],
        rope_scaling_factor=float(rs.factor),
    )
    if rs.strategy == "dynamic_ntk":
        notes.append(
            "model.rope_scaling.strategy=dynamic_ntk: run_finetune.py caches max_length "
            "positions and rescales only beyond them, so at max_length and below it trains "
            "with plain RoPE; ftlab rescales beyond the pretrained context "
            f"({m.arch.max_position_embeddings})."
        )
    if rs.strategy == "yarn":
        notes.append(
            "model.rope_scaling.strategy=yarn: run_finetune.py takes max_length as YaRN's "
            "original context; ftlab takes the pretrained context "
            f"({m.arch.max_position_embeddings}); the frequencies match only when they are "
            "equal."
        )
    return args


def _model(run: RunConfig, notes: list[str]) -> dict[str, Any]:
    m = run.model
    args: dict[str, Any] = _long_sequence_model(run, notes)
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


def _method(run: RunConfig) -> Any:
    method = registered_methods().get(run.method.name)
    if method is None:
        raise ConfigError(
            f"mode=export has no run_finetune.py mapping for method={run.method.name}: no such "
            f"method is registered ({', '.join(sorted(registered_methods()))})."
        )
    return method()


def run_finetune_arguments(
    run: RunConfig, run_dir: Path, derived: Derived | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(the argument dict run_finetune.py reads, notes on what it cannot express)."""
    method = _method(run)
    generation = generation_enabled(run) if derived is None else bool(derived.eval_generation)
    notes: list[str] = []
    args = {
        **_script_keys(run),
        **_model(run, notes),
        **_data(run, notes),
        **_evaluation(run, generation, notes),
        **_training(run, run_dir, notes),
        **method.export(run, notes),
    }
    _trainer_notes(run, notes)
    # Unset settings and a false ``lazy`` (the script's default) are left out.
    return {k: v for k, v in args.items() if v is not None and (k != "lazy" or v)}, notes


def export_run_finetune(run: RunConfig, derived: Derived, run_dir: RunDir | Path) -> dict[str, Any]:
    """Write the argument file of the stage's PaddleNLP script (``run_finetune.json`` for
    SFT, ``run_dpo.json`` / ``run_kto.json`` for preference stages; + notes) into the run
    dir and print how to run it."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    stage = get_stage(run.stage.name)
    file = stage.export_file
    if file == EXPORT:
        args, notes = run_finetune_arguments(run, run_dir.path, derived)
    else:  # the stage's script: its own data keys, the rest as run_finetune.py has them
        notes = []
        common = {
            **{k: v for k, v in _script_keys(run).items() if v is not None and k in MODEL_KEYS},
            **_model(run, notes),
            **_training(run, run_dir.path, notes),
            **_method(run).export(run, notes),
        }
        args = stage.export(run, common, notes)
        _trainer_notes(run, notes)
    notes_file = EXPORT_NOTES if file == EXPORT else f"{Path(file).stem}_notes.json"
    path, notes_path = run_dir / file, run_dir / notes_file
    run_dir.write_text(file, json.dumps(args, indent=2) + "\n")
    assumed = [f"assumed: {a}" for a in derived.assumptions or ()]
    run_dir.write_text(notes_file, json.dumps(notes + assumed, indent=2) + "\n")
    nproc = derived.nproc_per_node
    launcher = (
        f"python -m paddle.distributed.launch --devices {','.join(str(i) for i in range(nproc))} "
        if nproc > 1
        else "python "
    )
    lines = [
        f"wrote {path}",
        f"run it from a PaddleNLP checkout: {launcher}{stage.export_script} {path}",
    ]
    if notes:
        lines.append(f"not expressible in {Path(stage.export_script).name} ({notes_path.name}):")
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
