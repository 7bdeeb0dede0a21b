"""One training run, from a validated config to a complete experiment directory.

``train`` runs four stages, each a short function below:

1. ``prepare_data``: environment record, tokenizer, data (fingerprinted), what the data
   decides (examples, total steps), resume and rerun checks, the resolved config;
2. ``build_model``: TrainingArguments (they set up fleet, which model loading reads),
   the base model (the ``init_from`` model, merged once), its task metric, a frozen
   reference copy when the stage needs one, the method applied;
3. ``fit``: the stage's Trainer trains (from the checkpoint a resume picked), evaluates,
   and the fine-tuned model's task metric is scored;
4. ``finalize``: ``final/`` (the artefact, tokenizer and method record), samples,
   VisualDL's final scalars and the summary.

The stage (``run.stage``: sft, dpo, kto) decides the data, the reference model, the
Trainer and its summary metrics; everything else is the same for every stage. Every
file goes through ``RunDir``, which writes on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.alignment.registry import REFERENCE_COPY
from ftlab.config.derived import Derived
from ftlab.config.schema import ModelConfig, RunConfig
from ftlab.errors import ConfigError
from ftlab.record.provenance import environment_record
from ftlab.record.rundir import ENVIRONMENT, FINGERPRINTS, RESOLVED_CONFIG, SAMPLES, SUMMARY, RunDir
from ftlab.record.summary import Summary

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    tokenizer: Any
    data: Any  # ftlab.data.DataBundle
    derived: Derived
    checkpoint: Path | None  # the checkpoint a resume continues from
    stage: Any  # ftlab.alignment.registry.Stage: where the run differs by its objective
    model: ModelConfig  # the model loaded as the base (the init model after init_from)


@dataclass
class Built:
    method: Any  # ftlab.methods.registry.Method
    model: Any
    args: Any  # PaddleNLP's SFTConfig
    parameters: dict[str, int]
    base_metric: Any  # the task metric of the base model (None without one)
    reference: Any = None  # a frozen copy of the starting model (stages that need one)


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
    from ftlab.alignment.catalog import get_stage
    from ftlab.models.loading import load_tokenizer
    from ftlab.resolve.compose import resolved_config_yaml
    from ftlab.resolve.validate import check_demo_metric
    from ftlab.training.arguments import total_steps

    stage = get_stage(run.stage.name)
    tokenizer = load_tokenizer(run.model)
    data = stage.build_data(run, tokenizer)
    check_demo_metric(run, data.dev_records)  # before the model: pipeline models cannot generate
    model = run.model
    if run.init_from:
        from ftlab.alignment.init import init_model_path, inspect_init

        init_model = init_model_path(inspect_init(run), run_dir.path)
        derived = derived.with_(init_model=str(init_model))
        model = dataclasses.replace(run.model, name_or_path=str(init_model))
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
    return Prepared(tokenizer, data, derived, checkpoint, stage, model)


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
    if run.init_from:
        _materialize_init(run, run_dir)
    dtype = weight_dtype(run.precision)
    model = method.load_base(run.method, prepared.model, dtype=dtype)
    base_metric = task_metric(model, prepared.tokenizer, prepared.data.dev_records, run)
    reference = None
    if prepared.stage.reference(run) == REFERENCE_COPY:
        reference = method.load_base(run.method, prepared.model, dtype=dtype)
        for p in reference.parameters():
            p.stop_gradient = True
        reference.eval()
    if run.method.neftune_noise_alpha > 0:
        add_neftune_hook(model, run.method.neftune_noise_alpha)
    model = method.apply(model, run.method, prepared.model)
    params = parameter_counts(model)
    log.info("parameters: %s", params)
    return Built(method, model, args, params, base_metric, reference)


def fit(run: RunConfig, run_dir: RunDir, prepared: Prepared, built: Built) -> Fitted:
    from ftlab.data import count_tokens
    from ftlab.training.trainer import MetricsJsonl

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
        callbacks=[MetricsJsonl(run_dir)],
        count_tokens=count_tokens,
        shuffle=run.data.shuffle,
    )
    checkpoint = prepared.checkpoint
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - start
    eval_metrics = trainer.evaluate() if data.dev_dataset is not None else {}
    tuned = task_metric(built.model, prepared.tokenizer, data.dev_records, run)
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
    run_dir.write_final_scalars(fitted.steps, scalars)

    built.method.save_final(fitted.trainer, built.model, run_dir.final)
    run_dir.save_tokenizer(prepared.tokenizer)
    run_dir.write_method_record(run.method.name, prepared.model.name_or_path)

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
    import paddle.distributed as dist

    from ftlab.alignment.init import inspect_init, materialize_init

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
        log.warning("rerun of %s differs: %s", source, w)
        print(f"ftlab: rerun differs from the recorded run: {w}", flush=True)
    if not warnings:
        print(f"ftlab: rerun of {source}: data, ftlab commit and packages match.", flush=True)
    return warnings
