"""One training run, from a validated config to a complete experiment directory.

``train`` runs four stages, each a short function below:

1. ``prepare_data``: environment record, tokenizer, data (fingerprinted), what the data
   decides (examples, total steps), resume and rerun checks, the resolved config;
2. ``build_model``: TrainingArguments (they set up fleet, which model loading reads),
   the base model, its task metric, the method applied;
3. ``fit``: PaddleNLP's Trainer trains (from the checkpoint a resume picked), evaluates,
   and the fine-tuned model's task metric is scored;
4. ``finalize``: ``final/`` (the artefact, tokenizer and method record), samples,
   VisualDL's final scalars and the summary.

Every file goes through ``RunDir``, which writes on rank 0 only.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.config.derived import Derived
from ftlab.config.schema import RunConfig
from ftlab.errors import ConfigError
from ftlab.record.provenance import environment_record
from ftlab.record.rundir import ENVIRONMENT, FINGERPRINTS, RESOLVED_CONFIG, SAMPLES, SUMMARY, RunDir
from ftlab.record.summary import Summary
from ftlab.training.progress import console

log = logging.getLogger(__name__)


def data_line(stats: Any) -> str:
    """The data counts a person checks before training starts."""
    tr, dev = stats.train, stats.dev
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
    tokenizer: Any
    data: Any  # ftlab.data.DataBundle
    derived: Derived
    checkpoint: Path | None  # the checkpoint a resume continues from


@dataclass
class Built:
    method: Any  # ftlab.methods.registry.Method
    model: Any
    args: Any  # PaddleNLP's SFTConfig
    parameters: dict[str, int]
    base_metric: Any  # the task metric of the base model (None without one)


@dataclass
class Fitted:
    trainer: Any
    steps: int
    train_seconds: float
    eval_metrics: dict[str, float]
    tuned_metric: Any


def train(run: RunConfig, run_dir: RunDir, derived: Derived) -> Summary:
    from ftlab.training.memory import reset_peak_memory

    started = time.perf_counter()
    reset_peak_memory()  # one process may run several sweep jobs
    run_dir = RunDir(run_dir.path, is_main=_is_rank_zero())
    run_dir.write_json(ENVIRONMENT, environment_record(derived.device))
    seed_everything(run.train.seed)
    prepared = prepare_data(run, run_dir, derived)
    built = build_model(run, run_dir, prepared)
    fitted = fit(run, run_dir, prepared, built)
    return finalize(run, run_dir, prepared, built, fitted, started)


def prepare_data(run: RunConfig, run_dir: RunDir, derived: Derived) -> Prepared:
    from ftlab.data import build_data
    from ftlab.models.loading import load_tokenizer
    from ftlab.resolve.compose import resolved_config_yaml
    from ftlab.resolve.validate import check_demo_metric
    from ftlab.training.arguments import total_steps

    console.info("load   tokenizer and data (%s: %s)", run.data.name, run.data.path)
    tokenizer = load_tokenizer(run.model)
    data = build_data(
        run.data,
        tokenizer,
        seed=run.train.seed,
        need_dev=True,  # eval loss and the task metric are part of every summary
        max_steps=run.train.max_steps if run.train.max_steps > 0 else None,
        # PaddleNLP's Trainer shards map and iterable datasets across data-parallel
        # ranks itself; sharding here too would split twice.
        world_size=1,
        rank=0,
    )
    check_demo_metric(run, data.dev_records)  # before the model: pipeline models cannot generate
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
    run_dir.write_json(FINGERPRINTS, data.fingerprints)
    run_dir.write_text(RESOLVED_CONFIG, resolved_config_yaml(run, derived))
    console.info(data_line(data.stats))
    return Prepared(tokenizer, data, derived, checkpoint)


def build_model(run: RunConfig, run_dir: RunDir, prepared: Prepared) -> Built:
    from ftlab.methods.catalog import get_method
    from ftlab.methods.neftune import add_neftune_hook
    from ftlab.models.loading import parameter_counts, weight_dtype
    from ftlab.training.arguments import training_arguments

    method = get_method(run.method.name)
    if run.parallel.cpu_emulation and prepared.derived.device == "cpu":
        from ftlab.distributed.emulation import install_cpu_shims

        install_cpu_shims()
    # Before the model: the arguments set up fleet, which tensor-parallel loading reads.
    args = training_arguments(
        run,
        run_dir.path,
        prepared.derived.total_steps,
        has_eval=prepared.data.dev_dataset is not None,
        unified_checkpoint=method.unified_checkpoint,
    )
    console.info("load   model %s (%s)", run.model.name, run.model.name_or_path)
    model = method.load_base(run.method, run.model, dtype=weight_dtype(run.precision))
    base_metric = task_metric(model, prepared.tokenizer, prepared.data.dev_records, run)
    if run.method.neftune_noise_alpha > 0:
        add_neftune_hook(model, run.method.neftune_noise_alpha)
    model = method.apply(model, run.method, run.model)
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
    return Built(method, model, args, params, base_metric)


def fit(run: RunConfig, run_dir: RunDir, prepared: Prepared, built: Built) -> Fitted:
    from ftlab.data import count_tokens
    from ftlab.training.trainer import ConsoleProgress, FtlabTrainer, MetricsJsonl

    data = prepared.data
    trainer = FtlabTrainer(
        model=built.model,
        args=built.args,
        train_dataset=data.train_dataset,
        eval_dataset=data.dev_dataset,
        tokenizer=prepared.tokenizer,
        data_collator=data.collate_fn,
        callbacks=[MetricsJsonl(run_dir), ConsoleProgress()],
        count_tokens=count_tokens,
        shuffle=run.data.shuffle,
    )
    checkpoint = prepared.checkpoint
    t, d = run.train, prepared.derived
    console.info(
        "train  %d steps, global batch %d, lr %.1e %s%s",
        d.total_steps,
        d.global_batch_size,
        t.learning_rate,
        t.lr_scheduler_type,
        f", from {checkpoint.name}" if checkpoint else "",
    )
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - start
    eval_metrics = trainer.evaluate() if data.dev_dataset is not None else {}
    if "eval_loss" in eval_metrics:
        console.info(
            "eval   loss %.4f, perplexity %.2f",
            eval_metrics["eval_loss"],
            eval_metrics.get("eval_ppl", float("nan")),
        )
    tuned = task_metric(built.model, prepared.tokenizer, data.dev_records, run)
    if tuned is not None:
        console.info("tuned  entity recall %.3f (base %.3f)", tuned.score, built.base_metric.score)
    if tuned is not None:
        trainer.log(
            {"eval_entity_recall_base": built.base_metric.score, "eval_entity_recall": tuned.score}
        )
    return Fitted(trainer, result.global_step, train_seconds, eval_metrics, tuned)


def finalize(
    run: RunConfig,
    run_dir: RunDir,
    prepared: Prepared,
    built: Built,
    fitted: Fitted,
    started: float,
) -> Summary:
    from ftlab.training.memory import peak_memory_mb

    base, tuned, evals = built.base_metric, fitted.tuned_metric, fitted.eval_metrics
    scalars = {
        f"final/{k}": [(fitted.steps, evals[k])] for k in ("eval_loss", "eval_ppl") if k in evals
    }
    if tuned is not None:
        # One curve: the base model at step 0, the fine-tuned one at the last step.
        scalars["final/entity_recall"] = [(0, base.score), (fitted.steps, tuned.score)]
    run_dir.write_final_scalars(fitted.steps, scalars)

    built.method.save_final(fitted.trainer, built.model, run_dir.final)
    run_dir.save_tokenizer(prepared.tokenizer)
    run_dir.write_method_record(run.method.name, run.model.name_or_path)
    console.info("saved  final/ (%s, with the tokenizer) and checkpoints/", run.method.name)

    train_logs = run_dir.train_logs()
    summary = Summary(
        run_dir=str(run_dir),
        model=run.model.name,
        method=run.method.name,
        steps=fitted.steps,
        parameters=built.parameters,
        first_loss=train_logs[0]["loss"] if train_logs else None,
        final_loss=train_logs[-1]["loss"] if train_logs else None,
        # PaddleNLP's training_loss averages only the steps of the last process after a
        # resume; this weighs every logged interval by its number of steps instead.
        train_loss_mean=_mean_train_loss(train_logs),
        eval_loss=evals.get("eval_loss"),
        eval_ppl=evals.get("eval_ppl"),
        entity_recall_base=base.score if base else None,
        entity_recall=tuned.score if tuned else None,
        tokens_per_second=_median(train_logs, "tokens_per_second"),
        effective_tokens_per_second=_median(train_logs, "effective_tokens_per_second"),
        peak_memory_mb=round(peak_memory_mb(), 1),
        train_seconds=round(fitted.train_seconds, 2),
        wall_seconds=round(time.perf_counter() - started, 2),
        derived=prepared.derived.to_dict(),
        data=prepared.data.stats.to_dict(),
    )
    if tuned is not None:
        run_dir.write_jsonl(SAMPLES, _samples(base, tuned, run.eval.num_samples))
    run_dir.write_json(SUMMARY, summary.to_dict())
    return summary


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def task_metric(model: Any, tokenizer: Any, records: list[dict], run: RunConfig) -> Any:
    """Entity recall on dev records that carry an ``entities`` list (None when none do)."""
    if not run.eval.demo_metric or not any("entities" in r for r in records):
        return None
    from ftlab.evaluation.entity_recall import entity_recall

    return entity_recall(
        model,
        tokenizer,
        [r for r in records if "entities" in r],
        max_new_tokens=run.eval.max_new_tokens,
        batch_size=run.eval.batch_size,
    )


def _samples(base: Any, tuned: Any, n: int) -> list[dict[str, Any]]:
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
    import paddle.distributed as dist

    return dist.get_rank() <= 0


def _prepare_resume(run: RunConfig, run_dir: RunDir, derived: Derived) -> tuple[Path, Derived]:
    from ftlab.record.resume import check_resume_config, latest_complete_checkpoint
    from ftlab.resolve.compose import to_plain_dict

    changes = check_resume_config(run_dir.path, to_plain_dict(run))
    checkpoint = latest_complete_checkpoint(run_dir.path)
    if checkpoint is None:
        raise ConfigError(
            f"resume={run_dir}: no complete checkpoint under {run_dir.checkpoints}. "
            "Nothing to resume from; start the run again (rerun=) instead."
        )
    step = int(checkpoint.name.rsplit("-", 1)[1])
    dropped = run_dir.truncate_metrics(step)
    log.info(
        "resuming from %s (step %d); %d metric lines after it dropped", checkpoint, step, dropped
    )
    return checkpoint, derived.with_(resume_changes=changes, resumed_from=str(checkpoint))


def _rerun_differences(run: RunConfig, fingerprints: dict[str, str], device: str) -> list[str]:
    from ftlab.record.resume import reproducibility_warnings

    source = Path(run.rerun)
    warnings = reproducibility_warnings(source, fingerprints, environment_record(device))
    for w in warnings:
        log.warning("rerun differs from the recorded run: %s (recorded run: %s)", w, source)
    if not warnings:
        console.info("rerun of %s: data, ftlab commit and packages match.", source)
    return warnings
