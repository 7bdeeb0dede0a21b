"""One training run, from a validated config to a complete experiment directory.

The steps, in order: record the environment -> tokenizer -> data (fingerprinted) ->
resolved config -> base model -> task metric of the base -> method -> PaddleNLP Trainer
-> evaluation -> task metric of the fine-tuned model -> final artefact -> summary.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

from ftlab.config.load import resolved_config_yaml
from ftlab.config.schema import RunConfig
from ftlab.run.record import environment_record, write_json, write_text

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    import numpy as np
    import paddle

    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def count_parameters(model: Any) -> dict[str, int]:
    """Total and trainable parameter counts; quantized base weights count as parameters.

    A quantized layer holds its base weight as packed codes (buffers, not parameters), so
    without this the total of a QLoRA model would leave the base out.
    """
    total = sum(int(p.size) for p in model.parameters())
    trainable = sum(int(p.size) for p in model.parameters() if not p.stop_gradient)
    for layer in model.sublayers():
        if hasattr(layer, "quantized_weight"):
            total += layer.in_features * layer.out_features
    return {"total": total, "trainable": trainable}


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


def model_dtype(run: RunConfig) -> str:
    # O2 keeps the weights in the 16-bit dtype; O1 keeps fp32 master weights.
    return run.precision.dtype if run.precision.amp_level == "O2" else "float32"


def train(run: RunConfig, run_dir: Path, derived: dict[str, Any]) -> dict[str, Any]:
    from ftlab.config.validate import check_demo_metric
    from ftlab.data import build_data, count_tokens
    from ftlab.methods import get_method
    from ftlab.methods.neftune import add_neftune_hook
    from ftlab.models import load_tokenizer
    from ftlab.trainer import (
        FtlabTrainer,
        MetricsJsonl,
        peak_memory_mb,
        reset_peak_memory,
        total_steps,
        training_arguments,
    )

    started = time.perf_counter()
    reset_peak_memory()  # one process may run several sweep jobs
    is_main = _is_rank_zero()
    if is_main:
        write_json(run_dir / "environment.json", environment_record(derived["device"]))
    seed_everything(run.train.seed)

    tokenizer = load_tokenizer(run.model)
    need_dev = True  # eval loss and the task metric are part of every summary
    data = build_data(
        run.data,
        tokenizer,
        seed=run.train.seed,
        need_dev=need_dev,
        max_steps=run.train.max_steps if run.train.max_steps > 0 else None,
        # PaddleNLP's Trainer shards map and iterable datasets across
        # data-parallel ranks itself; sharding here too would split twice.
        world_size=1,
        rank=0,
    )
    check_demo_metric(run, data.dev_records)  # before the model: pipeline models cannot generate
    num_train = _length(data.train_dataset)
    derived["train_examples"] = num_train
    derived["total_steps"] = total_steps(run, num_train, derived["global_batch_size"])
    derived["data_format"] = data.format
    checkpoint = None
    if run.resume:
        checkpoint = _prepare_resume(run, run_dir, derived)
    if run.rerun:
        derived["rerun_of"] = run.rerun
        derived["rerun_differences"] = _rerun_differences(run, data.fingerprints, derived)
    if is_main:
        write_json(run_dir / "data_fingerprints.json", data.fingerprints)
        write_text(run_dir / "resolved_config.yaml", resolved_config_yaml(run, derived))

    method = get_method(run.method.name)
    if run.parallel.cpu_emulation and derived["device"] == "cpu":
        from ftlab.emulation import install_cpu_shims

        install_cpu_shims()
    # Before the model: the arguments set up fleet, which tensor-parallel loading reads.
    args = training_arguments(
        run,
        run_dir,
        derived["total_steps"],
        has_eval=data.dev_dataset is not None,
        unified_checkpoint=method.unified_checkpoint,
    )
    model = method.load_base(run.model, model_dtype(run), run.method)
    base_metric = task_metric(model, tokenizer, data.dev_records, run)

    if run.method.neftune_noise_alpha > 0:
        add_neftune_hook(model, run.method.neftune_noise_alpha)
    model = method.apply(model, run.method, run.model)
    params = count_parameters(model)
    log.info("parameters: %s", params)

    metrics_path = run_dir / "metrics.jsonl"
    trainer = FtlabTrainer(
        model=model,
        args=args,
        train_dataset=data.train_dataset,
        eval_dataset=data.dev_dataset,
        tokenizer=tokenizer,
        data_collator=data.collate_fn,
        callbacks=[MetricsJsonl(metrics_path)] if is_main else [],
        count_tokens=count_tokens,
        shuffle=run.data.shuffle,
    )
    train_start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.perf_counter() - train_start
    eval_metrics = trainer.evaluate() if data.dev_dataset is not None else {}
    tuned_metric = task_metric(model, tokenizer, data.dev_records, run)
    if tuned_metric is not None:
        trainer.log(
            {"eval_entity_recall_base": base_metric.score, "eval_entity_recall": tuned_metric.score}
        )
    if is_main:
        _write_final_scalars(
            run_dir / "visualdl", result.global_step, eval_metrics, base_metric, tuned_metric
        )

    final_dir = run_dir / "final"
    method.save_final(trainer, model, final_dir)
    if is_main:
        tokenizer.save_pretrained(str(final_dir))
        write_json(
            final_dir / "ftlab_method.json",
            {"method": run.method.name, "base_model": run.model.name_or_path},
        )

    train_logs = _train_logs(metrics_path) if is_main else []
    summary = {
        "run_dir": str(run_dir),
        "status": "completed",
        "model": run.model.name,
        "method": run.method.name,
        "steps": result.global_step,
        "parameters": params,
        "first_loss": train_logs[0]["loss"] if train_logs else None,
        "final_loss": train_logs[-1]["loss"] if train_logs else None,
        # PaddleNLP's training_loss averages only the steps of the last process after a
        # resume; this weighs every logged interval by its number of steps instead.
        "train_loss_mean": _mean_train_loss(train_logs),
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval_ppl": eval_metrics.get("eval_ppl"),
        "entity_recall_base": base_metric.score if base_metric else None,
        "entity_recall": tuned_metric.score if tuned_metric else None,
        "tokens_per_second": _median(train_logs, "tokens_per_second"),
        "effective_tokens_per_second": _median(train_logs, "effective_tokens_per_second"),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "train_seconds": round(train_seconds, 2),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "derived": derived,
        "data": data.stats.to_dict(),
    }
    if is_main:
        if tuned_metric is not None:
            _write_samples(
                run_dir / "samples.jsonl", base_metric, tuned_metric, run.eval.num_samples
            )
        write_json(run_dir / "summary.json", summary)
    return summary


def _write_final_scalars(
    logdir: Path, step: int, eval_metrics: dict, base: Any, tuned: Any
) -> None:
    """Post-training scalars, in their own VisualDL file of the same log dir.

    PaddleNLP's VisualDL callback closes its writer at the end of training, so the final
    evaluation and the task metric would otherwise never reach VisualDL.
    """
    from visualdl import LogWriter

    with LogWriter(logdir=str(logdir), file_name="vdlrecords.final.log") as writer:
        for key in ("eval_loss", "eval_ppl"):
            if key in eval_metrics:
                writer.add_scalar(f"final/{key}", float(eval_metrics[key]), step)
        if tuned is not None:
            # One curve: the base model at step 0, the fine-tuned one at the last step.
            writer.add_scalar("final/entity_recall", base.score, 0)
            writer.add_scalar("final/entity_recall", tuned.score, step)


def _write_samples(path: Path, base: Any, tuned: Any, n: int) -> None:
    with open(path, "w") as f:
        for b, t in list(zip(base.records, tuned.records, strict=True))[:n]:
            f.write(
                json.dumps(
                    {
                        "prompt": b.prompt,
                        "entities": b.entities,
                        "base_output": b.output,
                        "base_hits": b.hits,
                        "finetuned_output": t.output,
                        "finetuned_hits": t.hits,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )


def _train_logs(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("kind") == "train"]


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


def _prepare_resume(run: RunConfig, run_dir: Path, derived: dict[str, Any]) -> Path:
    from ftlab.config.load import to_plain_dict
    from ftlab.errors import ConfigError
    from ftlab.run.resume import check_resume_config, latest_complete_checkpoint, truncate_metrics

    derived["resume_changes"] = check_resume_config(run_dir, to_plain_dict(run))
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(
            f"resume={run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}. "
            "Nothing to resume from; start the run again (rerun=) instead."
        )
    step = int(checkpoint.name.rsplit("-", 1)[1])
    derived["resumed_from"] = str(checkpoint)
    if _is_rank_zero():
        dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
        log.info(
            "resuming from %s (step %d); %d metric lines after it dropped",
            checkpoint,
            step,
            dropped,
        )
    return checkpoint


def _rerun_differences(
    run: RunConfig, fingerprints: dict[str, str], derived: dict[str, Any]
) -> list[str]:
    from ftlab.run.resume import reproducibility_warnings

    source = Path(run.rerun)
    warnings = reproducibility_warnings(source, fingerprints, environment_record(derived["device"]))
    for w in warnings:
        log.warning("rerun of %s differs: %s", source, w)
        print(f"ftlab: rerun differs from the recorded run: {w}", flush=True)
    if not warnings:
        print(f"ftlab: rerun of {source}: data, ftlab commit and packages match.", flush=True)
    return warnings
