"""One training run, from a validated config to a complete experiment directory.

``train`` runs four stages, each a short function below:

1. ``prepare_data``: environment record, tokenizer, data (fingerprinted), what the data
   decides (examples, total steps), resume and rerun checks, the resolved config (for a
   resume, the checkpoint is checked here and the record is written only once the
   Trainer has loaded it: a resume that fails first leaves the run's record untouched);
2. ``build_model``: TrainingArguments (they set up fleet, which model loading reads),
   the base model (the ``init_from`` model, merged once), its task and generation
   metrics, a frozen reference copy when the stage needs one, the method applied;
3. ``fit``: the stage's Trainer trains (from the checkpoint a resume picked), evaluates,
   and the fine-tuned model's metrics are scored;
4. ``finalize``: ``final/`` (the artefact, tokenizer and method record), samples,
   the trackers' final scalars and the summary.

The stage (``run.stage``: sft, dpo, kto) decides the data, the reference model, the
Trainer and its summary metrics; everything else is the same for every stage. Every
file goes through ``RunDir``, which writes on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import paddle
import paddle.distributed as dist

from ftlab import signals
from ftlab.config.cpu_runtime import apply_cpu_threads
from ftlab.config.derived import Derived
from ftlab.config.schema import ModelConfig, RunConfig
from ftlab.data.collate import count_tokens
from ftlab.data.formats import TEXT_FORMATS
from ftlab.distributed.emulation import install_cpu_shims
from ftlab.errors import ConfigError
from ftlab.evaluation.entity_recall import EntityRecall, entity_recall
from ftlab.evaluation.generation import prompt_ids
from ftlab.evaluation.text_metrics import GenerationResult, evaluate_generation, resolve_units
from ftlab.interop.hf_in import conversion_records
from ftlab.methods.catalog import get_method
from ftlab.methods.neftune import add_neftune_hook
from ftlab.models.cpu_layers import use_fast_cpu_layers
from ftlab.models.loading import load_tokenizer, parameter_counts, weight_dtype
from ftlab.models.weights import changed_weights, refuse_pickles, weight_hashes
from ftlab.record import phases
from ftlab.record.provenance import environment_record
from ftlab.record.resume import (
    check_resume_config,
    checkpoint_step,
    pick_checkpoint,
    reproducibility_warnings,
)
from ftlab.record.rundir import (
    BASE_WEIGHTS,
    ENVIRONMENT,
    FINGERPRINTS,
    METHOD_RECORD,
    MODEL_SOURCE,
    PREDICTIONS,
    RESOLVED_CONFIG,
    SAMPLES,
    SUMMARY,
    RunDir,
)
from ftlab.record.summary import Summary
from ftlab.resolve.compose import resolved_config_yaml, to_plain_dict
from ftlab.resolve.validate import check_demo_metric, refuse_text_generation
from ftlab.stages.catalog import get_stage
from ftlab.stages.init import init_model_path, inspect_init, materialize_init
from ftlab.stages.registry import REFERENCE_COPY
from ftlab.training.arguments import recompute_model_config, total_steps, training_arguments
from ftlab.training.best import best_record, early_stopping_callbacks, stopped_early_at
from ftlab.training.memory import peak_memory_mb, reset_peak_memory
from ftlab.training.progress import console
from ftlab.training.trackers import (
    attach_trackers,
    close_open_trackers,
    finish_trackers,
    tracking_status,
    write_final_scalars,
)
from ftlab.training.trainer import ConsoleProgress, MetricsJsonl, RecordStart, write_record

if TYPE_CHECKING:  # PaddleNLP's classes, named for the types only
    from paddlenlp.trainer import Trainer
    from paddlenlp.transformers import PretrainedTokenizer
    from paddlenlp.trl import SFTConfig

    from ftlab.data.bundle import DataBundle
    from ftlab.data.stats import DataStats
    from ftlab.methods.registry import Method
    from ftlab.stages.registry import Stage

log = logging.getLogger(__name__)


def data_line(stats: DataStats) -> str:
    """The data counts a person checks before training starts."""
    tr, dev = stats.train, stats.dev
    if stats.streaming:  # nothing is counted before the stream is read
        text = "data   train streamed (read lazily; counts in the summary)"
    else:
        text = f"data   train {tr.examples:,} examples ({tr.tokens:,} tokens)"
    if dev is not None:
        text += f", dev {dev.examples:,} ({dev.tokens:,} tokens)"
    text += f"; format {stats.format}, packing {stats.packing}"
    cut = {
        "skipped": sum(tr.skipped.values()),
        "prompts cut": tr.truncated_prompt,
        "answers cut": tr.truncated_target,
        "dropped overlong": tr.dropped_overlong,
    }
    extra = ", ".join(f"{v:,} {k}" for k, v in cut.items() if v)
    return text + (f"; train: {extra}" if extra else "")


@dataclass
class Prepared:
    tokenizer: PretrainedTokenizer
    data: DataBundle
    derived: Derived
    checkpoint: Path | None  # the checkpoint a resume continues from
    stage: Stage  # where the run differs by its objective
    model: ModelConfig  # the model loaded as the base (the init model after init_from)
    # Writes what the run records when training really starts.
    record_start: RecordStart | None = None


@dataclass
class Built:
    method: Method
    model: paddle.nn.Layer
    args: SFTConfig
    parameters: dict[str, int]
    base_metric: EntityRecall | None  # the task metric of the base model (None without one)
    base_generation: GenerationResult | None = None  # BLEU/ROUGE of its dev generations
    reference: paddle.nn.Layer | None = None  # a frozen copy of the starting model


@dataclass
class Fitted:
    trainer: Trainer
    steps: int
    train_seconds: float
    eval_metrics: dict[str, float]
    tuned_metric: EntityRecall | None
    tuned_generation: GenerationResult | None = None


def cpu_record(derived: Derived) -> dict[str, Any] | None:
    """How this CPU run computes (``launch.cpu_*``), for ``environment.json``."""
    if derived.cpu_threads is None:
        return None
    return {
        "math_threads_per_process": derived.cpu_threads,
        "mkl": derived.mkl_path,
        "layers": derived.cpu_layers,
    }


def train(run: RunConfig, run_dir: RunDir, derived: Derived) -> Summary:
    started = time.perf_counter()
    reset_peak_memory()  # one process may run several sweep jobs
    run_dir = RunDir(run_dir.path, is_main=_is_rank_zero())
    if derived.cpu_threads is not None:
        apply_cpu_threads(derived.cpu_threads)
        use_fast_cpu_layers(run.launch.cpu_fast_path)
        if _is_rank_zero():
            console.info(
                "cpu    %s; math threads per process: %d; layers: %s",
                derived.mkl_path,
                derived.cpu_threads,
                derived.cpu_layers,
            )
    if not run.resume:  # a resume records its environment once it really starts
        run_dir.write_json(ENVIRONMENT, environment_record(derived.device, cpu_record(derived)))
    seed_everything(run.train.seed)
    prepared = prepare_data(run, run_dir, derived)
    phases.mark("data")
    built = build_model(run, run_dir, prepared)
    try:
        fitted = fit(run, run_dir, prepared, built)
        summary = finalize(run, run_dir, prepared, built, fitted, started)
    except BaseException:
        close_open_trackers()  # an MLflow run of a failed or interrupted run ends FAILED
        raise
    phases.mark("save")
    phases.log_since("compose")
    return summary


def _generation_for_data(run: RunConfig, data: Any, derived: Derived) -> Derived:
    """Generation metrics need prompt/answer turns; text documents (named or detected by
    data.format=auto, alone or as a mixture's source) have none. Asked for explicitly:
    refused; on by default: turned off with one console line, recorded in
    ``derived.eval_generation``."""

    formats = {data.format, *(p.format for p in data.parts.values())}
    text = sorted(formats & set(TEXT_FORMATS))
    g = run.eval.generation
    if not text or not (run.data.generation_metric if g is None else g):
        return derived
    if g:
        raise refuse_text_generation(text[0])
    console.info(
        "eval   generation metrics off: data.format=%s has no prompt/answer turns "
        "(derived.eval_generation=false)",
        text[0],
    )
    return derived.with_(eval_generation=False)


def prepare_data(run: RunConfig, run_dir: RunDir, derived: Derived) -> Prepared:
    stage = get_stage(run.stage.name)
    console.info("load   tokenizer and data (%s: %s)", run.data.name, run.data.path)
    tokenizer = load_tokenizer(run.model)
    data = stage.build_data(run, tokenizer)
    check_demo_metric(run, data.dev_records)  # before the model: pipeline models cannot generate
    model = run.model
    if run.init_from:
        init_model = init_model_path(inspect_init(run), run_dir.path)
        derived = derived.with_(init_model=str(init_model))
        model = dataclasses.replace(run.model, name_or_path=str(init_model))
    derived = _generation_for_data(run, data, derived)
    examples = _length(data.train_dataset)
    derived = derived.with_(
        train_examples=examples,
        total_steps=total_steps(run, examples, derived.global_batch_size),
        data_format=data.format,
    )
    checkpoint = None
    if run.resume:
        checkpoint, derived = _prepare_resume(run, run_dir, derived)
    if run.rerun:
        derived = derived.with_(
            rerun_of=run.rerun,
            rerun_differences=_rerun_differences(run, data.fingerprints, derived.device),
        )

    record = {FINGERPRINTS: data.fingerprints, RESOLVED_CONFIG: resolved_config_yaml(run, derived)}

    if conversion_records():  # a Hugging Face base: its source hashes and conversion
        record[MODEL_SOURCE] = {"hf_conversions": conversion_records()}
    console.info(data_line(data.stats))
    if checkpoint is None:
        write_record(run_dir, record)
        return Prepared(tokenizer, data, derived, None, stage, model, RecordStart(run_dir, {}))
    record[ENVIRONMENT] = environment_record(derived.device, cpu_record(derived))
    start = RecordStart(run_dir, record, checkpoint)
    return Prepared(tokenizer, data, derived, checkpoint, stage, model, start)


def build_model(run: RunConfig, run_dir: RunDir, prepared: Prepared) -> Built:
    method = get_method(run.method.name)
    if run.parallel.cpu_emulation and prepared.derived.device == "cpu":
        install_cpu_shims()
    # Before the model: the arguments set up fleet, which tensor-parallel loading reads.
    args = training_arguments(
        run,
        run_dir.path,
        prepared.derived.total_steps,
        has_eval=prepared.data.dev_dataset is not None,
        unified_checkpoint=method.unified_checkpoint,
    )
    console.info("load   model %s (%s)", run.model.name, prepared.model.name_or_path)
    if run.init_from:
        _materialize_init(run, run_dir)
    dtype, overrides = weight_dtype(run.precision), recompute_model_config(run)
    model = method.load_base(run.method, prepared.model, dtype=dtype, overrides=overrides)
    phases.mark("model load")
    base_generation = generation_metric(model, prepared, run)
    base_metric = task_metric(
        model, prepared.tokenizer, prepared.data.dev_records, run, base_generation
    )
    phases.mark("base eval")
    reference = None
    if prepared.stage.reference(run) == REFERENCE_COPY:
        reference = method.load_base(run.method, prepared.model, dtype=dtype, overrides=overrides)
        for p in reference.parameters():
            p.stop_gradient = True
        reference.eval()
    if run.method.neftune_noise_alpha > 0:
        add_neftune_hook(model, run.method.neftune_noise_alpha)
    model = method.apply(model, run.method, prepared.model)
    params = parameter_counts(model)
    log.info("parameters: %s", params)
    share = 100 * params["trainable"] / max(params["total"], 1)
    console.info(
        "model  %s loaded (%s): %s parameters, %s trainable (%.2f%%)",
        run.model.name,
        run.method.name,
        f"{params['total']:,}",
        f"{params['trainable']:,}",
        share,
    )
    if base_metric is not None:
        console.info(
            "base   entity recall %.3f on %d dev prompts",
            base_metric.score,
            len(base_metric.records),
        )
    return Built(method, model, args, params, base_metric, base_generation, reference)


def fit(run: RunConfig, run_dir: RunDir, prepared: Prepared, built: Built) -> Fitted:
    data = prepared.data
    trainer = prepared.stage.make_trainer(
        run,
        reference_model=built.reference,
        method=built.method,
        model=built.model,
        args=built.args,
        train_dataset=data.train_dataset,
        eval_dataset=data.dev_dataset,
        tokenizer=prepared.tokenizer,
        data_collator=data.collate_fn,
        callbacks=[
            prepared.record_start,
            MetricsJsonl(run_dir),
            ConsoleProgress(),
            *early_stopping_callbacks(run),
        ],
        count_tokens=count_tokens,
        shuffle=run.data.shuffle,
    )
    attach_trackers(trainer, run_dir, run.train.report_to)
    checkpoint = prepared.checkpoint
    base_eval: dict[str, float] = {}
    if data.format in TEXT_FORMATS and data.dev_dataset is not None:
        # Pretraining-style text has no task metric: the held-out loss before training is
        # the baseline that continued pretraining should lower.
        base_eval = trainer.evaluate(metric_key_prefix="eval_base")
    t, d = run.train, prepared.derived
    console.info(
        "train  %d steps, global batch %d, lr %.1e %s%s",
        d.total_steps,
        d.global_batch_size,
        t.learning_rate,
        t.lr_scheduler_type,
        f", from {checkpoint.name}" if checkpoint else "",
    )
    signals.install()  # PaddleNLP's import replaced the SIGTERM handler (ftlab.signals)
    phases.mark("trainer setup")
    start = time.perf_counter()
    if checkpoint is not None and checkpoint_step(checkpoint) >= prepared.derived.total_steps:
        # Every step is in the checkpoint (the run stopped after saving its last one):
        # PaddleNLP's train() would run one step beyond max_steps, so load and go on.
        steps = trainer.load_trained_checkpoint(checkpoint)
        prepared.record_start.write()
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        steps = result.global_step
    train_seconds = time.perf_counter() - start
    phases.mark("train")
    eval_metrics = trainer.evaluate() if data.dev_dataset is not None else {}
    if "eval_loss" in eval_metrics:
        ppl = eval_metrics.get("eval_ppl") if prepared.stage.loss_is_likelihood else None
        console.info(
            "eval   loss %.4f%s",
            eval_metrics["eval_loss"],
            "" if ppl is None else f", perplexity {ppl:.2f}",
        )
    if "eval_base_loss" in base_eval:
        eval_metrics["eval_base_loss"] = base_eval["eval_base_loss"]
    for name, part in data.parts.items():  # a mixture: eval loss per source with a dev split
        if part.dev_dataset is not None:
            evals = trainer.evaluate(
                eval_dataset=part.dev_dataset, metric_key_prefix=f"eval_{name}"
            )
            data.stats.set_source_eval_loss(name, evals.get(f"eval_{name}_loss"))
    tuned_generation = generation_metric(built.model, prepared, run)
    tuned = task_metric(built.model, prepared.tokenizer, data.dev_records, run, tuned_generation)
    if tuned is not None:
        console.info("tuned  entity recall %.3f (base %.3f)", tuned.score, built.base_metric.score)
    if tuned is not None:
        trainer.log(
            {"eval_entity_recall_base": built.base_metric.score, "eval_entity_recall": tuned.score}
        )
    if tuned_generation is not None:
        trainer.log(
            {
                **{f"eval_{k}_base": v for k, v in _scores(built.base_generation).items()},
                **{f"eval_{k}": v for k, v in _scores(tuned_generation).items()},
            }
        )
    phases.mark("tuned eval")
    return Fitted(trainer, steps, train_seconds, eval_metrics, tuned, tuned_generation)


def finalize(
    run: RunConfig,
    run_dir: RunDir,
    prepared: Prepared,
    built: Built,
    fitted: Fitted,
    started: float,
) -> Summary:

    base, tuned, evals = built.base_metric, fitted.tuned_metric, fitted.eval_metrics
    stage = prepared.stage
    if not stage.loss_is_likelihood:
        evals = {k: v for k, v in evals.items() if k != "eval_ppl"}  # exp of a DPO loss is no ppl
    train_logs = run_dir.train_logs()
    stage_metrics = _stage_metrics(stage.summary_keys, train_logs, evals)
    scalars = {
        f"final/{k}": [(fitted.steps, evals[k])] for k in ("eval_loss", "eval_ppl") if k in evals
    }
    scalars.update({f"final/{k}": [(fitted.steps, v)] for k, v in stage_metrics.items()})
    if tuned is not None:
        # One curve: the base model at step 0, the fine-tuned one at the last step.
        scalars["final/entity_recall"] = [(0, base.score), (fitted.steps, tuned.score)]
    base_gen, tuned_gen = built.base_generation, fitted.tuned_generation
    if tuned_gen is not None:
        for key, value in _scores(tuned_gen).items():
            scalars[f"final/{key}"] = [(0, _scores(base_gen)[key]), (fitted.steps, value)]
        run_dir.write_jsonl(PREDICTIONS, _predictions(base_gen, tuned_gen))
    write_final_scalars(run_dir, fitted.steps, scalars, run.train.report_to, fitted.trainer)

    built.method.save_final(fitted.trainer, built.model, run_dir.final)
    run_dir.save_tokenizer(prepared.tokenizer)

    base_model = prepared.model.name_or_path
    run_dir.write_method_record(run.method.name, base_model, weight_hashes(base_model))
    console.info("saved  final/ (%s, with the tokenizer) and checkpoints/", run.method.name)

    summary = Summary(
        run_dir=str(run_dir),
        model=run.model.name,
        method=run.method.name,
        stage=stage.name,
        stage_metrics=stage_metrics,
        steps=fitted.steps,
        parameters=built.parameters,
        first_loss=train_logs[0]["loss"] if train_logs else None,
        final_loss=train_logs[-1]["loss"] if train_logs else None,
        # PaddleNLP's training_loss averages only the steps of the last process after a
        # resume; this weighs every logged interval by its number of steps instead.
        train_loss_mean=_mean_train_loss(train_logs),
        eval_loss=evals.get("eval_loss"),
        eval_ppl=evals.get("eval_ppl"),
        eval_loss_base=evals.get("eval_base_loss"),
        eval_ppl_base=math.exp(evals["eval_base_loss"]) if "eval_base_loss" in evals else None,
        entity_recall_base=base.score if base else None,
        entity_recall=tuned.score if tuned else None,
        generation=_generation_summary(base_gen, tuned_gen),
        tokens_per_second=_median(train_logs, "tokens_per_second"),
        effective_tokens_per_second=_median(train_logs, "effective_tokens_per_second"),
        peak_memory_mb=round(peak_memory_mb(), 1),
        train_seconds=round(fitted.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - started, 2),
        derived=prepared.derived.to_dict(),
        data=prepared.data.stats.to_dict(),
        best_checkpoint=best_record(run, fitted.trainer),
        stopped_early_at=stopped_early_at(run, fitted.steps, prepared.derived.total_steps),
        tracking=tracking_status(fitted.trainer, run.train.report_to),
    )
    if tuned is not None:
        run_dir.write_jsonl(SAMPLES, _samples(base, tuned, run.eval.num_samples))
    run_dir.write_json(SUMMARY, summary.to_dict())
    finish_trackers(fitted.trainer, run.train.report_to)
    return summary


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def task_metric(
    model: paddle.nn.Layer,
    tokenizer: PretrainedTokenizer,
    records: list[dict],
    run: RunConfig,
    generation: GenerationResult | None = None,
) -> EntityRecall | None:
    """Entity recall on dev records that carry an ``entities`` list (None when none do).

    When the generation metric already decoded the same prompts greedily with the same
    settings, its outputs are scored instead of generating them a second time.
    """
    if not run.eval.demo_metric or not any("entities" in r for r in records):
        return None

    scored = [r for r in records if "entities" in r]
    return entity_recall(
        model,
        tokenizer,
        scored,
        max_new_tokens=run.eval.max_new_tokens,
        batch_size=run.eval.batch_size,
        outputs=_reusable_outputs(tokenizer, records, run, generation),
    )


def _reusable_outputs(
    tokenizer: PretrainedTokenizer,
    records: list[dict],
    run: RunConfig,
    generation: GenerationResult | None,
) -> list[str] | None:
    """The generation metric's outputs for the entity records, when they are exactly what
    entity recall would generate: greedy, and the same prompt tokens (entity recall
    prompts with ``[bos] + encode(src)``, the metric as training renders the record)."""
    if generation is None or run.eval.decode_strategy != "greedy":
        return None

    items = generation.items
    if len(items) != len(records):
        return None
    outputs = []
    for record, item, text in zip(records, items, generation.predictions, strict=True):
        if "entities" not in record:
            continue
        if prompt_ids(tokenizer, str(record.get("src", ""))) != list(item.prompt_ids):
            return None
        outputs.append(text)
    return outputs


def generation_metric(
    model: paddle.nn.Layer, prepared: Prepared, run: RunConfig
) -> GenerationResult | None:
    """BLEU-4 and ROUGE-1/2/L of the model's dev generations (None when off)."""
    if not prepared.derived.eval_generation:
        return None

    items = prepared.data.generation_items()
    if not items:
        raise ConfigError(
            "eval.generation=true but the run has no dev records to generate for: give a dev "
            "split (dev.json, data.dev_path or data.dev_from_train) or set eval.generation=false."
        )
    e = run.eval
    references = [i.reference for i in items]
    result = evaluate_generation(
        model,
        prepared.tokenizer,
        [i.prompt_ids for i in items],
        references,
        units=resolve_units(references, e.metric_tokens),
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        strategy=e.decode_strategy,
        top_k=e.top_k,
        top_p=e.top_p,
        temperature=e.temperature,
        seed=run.train.seed,
    )
    result.items = items
    return result


def _scores(result: GenerationResult) -> dict[str, float]:
    s = result.scores
    return {"bleu4": s.bleu4, "rouge1": s.rouge1, "rouge2": s.rouge2, "rougel": s.rougel}


def _generation_summary(base: GenerationResult, tuned: GenerationResult | None) -> dict[str, Any]:
    if tuned is None:
        return {}
    return {
        "units": tuned.scores.units,
        "records": tuned.scores.records,
        "base": _scores(base),
        "finetuned": _scores(tuned),
    }


def _predictions(base: GenerationResult, tuned: GenerationResult) -> list[dict[str, Any]]:
    """``predictions.jsonl``: PaddleNLP's generated_output.json keys (output, tgt) plus the
    prompt, the base model's answer and, in a mixture, the source."""
    rows = []
    for item, b, t in zip(tuned.items, base.predictions, tuned.predictions, strict=True):
        row = {"src": item.prompt, "tgt": item.reference, "output": t, "base_output": b}
        if item.source is not None:
            row["source"] = item.source
        rows.append(row)
    return rows


def _samples(base: EntityRecall, tuned: EntityRecall, n: int) -> list[dict[str, Any]]:
    return [
        {
            "prompt": b.prompt,
            "entities": b.entities,
            "base_output": b.output,
            "base_hits": b.hits,
            "finetuned_output": t.output,
            "finetuned_hits": t.hits,
        }
        for b, t in list(zip(base.records, tuned.records, strict=True))[:n]
    ]


def _stage_metrics(
    keys: tuple[str, ...], train_logs: list[dict], evals: dict[str, float]
) -> dict[str, float]:
    """The stage's metrics of the last training interval (``train/...``) and of the dev
    set (``eval/...``)."""
    out: dict[str, float] = {}
    last = train_logs[-1] if train_logs else {}
    for key in keys:
        if key in last:
            out[f"train/{key}"] = float(last[key])
        if f"eval_{key}" in evals:
            out[f"eval/{key}"] = float(evals[f"eval_{key}"])
    return out


def _materialize_init(run: RunConfig, run_dir: RunDir) -> None:
    """The merged starting model, written by the main process; the others wait for it."""
    materialize_init(run, inspect_init(run), run_dir)
    if dist.get_world_size() > 1:
        dist.barrier()


def _mean_train_loss(rows: list[dict]) -> float | None:
    total, steps, previous = 0.0, 0, 0
    for r in sorted(rows, key=lambda r: r["step"]):
        n = r["step"] - previous
        total, steps, previous = total + r["loss"] * n, steps + n, r["step"]
    return total / steps if steps else None


def _median(rows: list[dict], key: str) -> float | None:
    values = sorted(r[key] for r in rows if key in r)
    return values[len(values) // 2] if values else None


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except (TypeError, RuntimeError):  # an iterable (streaming) dataset has no length
        return None


def _is_rank_zero() -> bool:
    return dist.get_rank() <= 0


def _prepare_resume(run: RunConfig, run_dir: RunDir, derived: Derived) -> tuple[Path, Derived]:
    """The checkpoint to continue from, checked whole and readable; nothing is written."""
    changes = check_resume_config(
        run_dir.path, {**to_plain_dict(run), "derived": derived.to_dict()}
    )
    checkpoint, warnings = pick_checkpoint(run_dir.path)

    # PaddleNLP's resume reads lora_model_state.pdparams, *.pdopt, scheduler.pdparams if there.
    refuse_pickles(checkpoint, run.model.allow_pickle, "checkpoint state")
    for warning in warnings:
        console.warning("%s", warning)
    step = checkpoint_step(checkpoint)
    if derived.total_steps is not None and step > derived.total_steps:
        raise ConfigError(
            f"resume={run_dir}: the run would end at step {derived.total_steps} "
            f"(train.max_steps / num_train_epochs) but {checkpoint.name} is already past it. "
            "Nothing was changed. Keep the recorded train.max_steps, or raise it."
        )
    log.info("resuming from %s (step %d)", checkpoint, step)
    return checkpoint, derived.with_(resume_changes=changes, resumed_from=str(checkpoint))


def _rerun_differences(run: RunConfig, fingerprints: dict[str, str], device: str) -> list[str]:
    source = Path(run.rerun)
    warnings = reproducibility_warnings(source, fingerprints, environment_record(device))
    recorded = RunDir(source).read_json(f"final/{METHOD_RECORD}").get(BASE_WEIGHTS) or {}
    warnings += [
        f"base model weights changed: {c}"
        for c in changed_weights(run.model.name_or_path, recorded)
    ]
    for w in warnings:
        log.warning("rerun differs from the recorded run: %s (recorded run: %s)", w, source)
    if not warnings:
        console.info("rerun of %s: data, ftlab commit and packages match.", source)
    return warnings
