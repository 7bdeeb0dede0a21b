"""PaddleNLP's Trainer, plus the measurements ftlab records at every logging step.

PaddleNLP logs loss, learning rate and samples/s. It does not count tokens (let alone
non-padding tokens, which is what packing improves) and reports no CPU peak memory, so
``FtlabTrainer`` counts the tokens of each batch it trains on and adds throughput and
peak memory to the logs before PaddleNLP's callbacks (VisualDL included) see them. The
same dict goes to ``metrics.jsonl`` through ``MetricsJsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paddle
from paddlenlp.trainer import TrainerCallback
from paddlenlp.trainer.trainer_utils import has_length
from paddlenlp.trl import SFTTrainer

from ftlab.distributed.batching import GlobalBatchSampler, global_unit_scale, target_tokens
from ftlab.methods.state import ADAPTER_STATE, load_trainable_state
from ftlab.record.resume import CHECKPOINT_RE, STAGING, checkpoint_step
from ftlab.record.rundir import (
    METRICS,
    DiskFullError,
    RunDir,
    dir_bytes,
    disk_full_message,
    is_disk_full,
)
from ftlab.record.status import mark_running
from ftlab.training import checkpoint_state as state_files
from ftlab.training.memory import peak_memory_mb
from ftlab.training.optimizers import use_ftlab_adamw_mini
from ftlab.training.progress import console, duration, progress_settings

log = logging.getLogger(__name__)


class FtlabTrainerMixin:
    """What every ftlab Trainer adds to PaddleNLP's: token counts, throughput and peak
    memory in the logs, the last step always logged, one global batch order for any
    number of ranks, per-rank loss weights, ftlab's AdamW-mini update, checkpoints renamed
    into place only when whole and free of pickles, a clear disk-full error, and resume
    from a checkpoint that already holds every step. Mixed in before a PaddleNLP Trainer
    class (``SFTTrainer`` here; ``DPOTrainer`` and ``KTOTrainer`` in
    ``ftlab.stages.trainers``)."""

    def __init__(
        self,
        *args: Any,
        count_tokens: Callable[[dict], tuple[int, int]],
        shuffle: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._shuffle = shuffle
        self._loss_scale: float | None = None
        self._count_tokens = count_tokens
        self._tokens = 0
        self._effective_tokens = 0
        self._interval_start = time.perf_counter()
        self.add_callback(LogLastStep())

    def load_trained_checkpoint(self, checkpoint: Path) -> int:
        """Load a checkpoint that already holds every step, without training; its step.

        ``Trainer.train`` resumed from the last step would train one step beyond
        ``max_steps`` before it checks the limit.
        """
        from paddlenlp.trainer.trainer_callback import TrainerState

        self._load_from_checkpoint(str(checkpoint))
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
        return self.state.global_step

    def loss_units(self, inputs: dict) -> int:
        """What this rank's loss is a mean over: target tokens (preference stages: records)."""
        return target_tokens(inputs["labels"])

    def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        total, effective = self._count_tokens(inputs)
        self._tokens += total
        self._effective_tokens += effective
        # Several ranks: weight each rank's loss by its share of the global batch's loss
        # units (ftlab.distributed.batching); pipeline layouts compute their loss elsewhere.
        if self.args.world_size > 1 and self.args.pipeline_parallel_degree <= 1:
            self._loss_scale = global_unit_scale(self.loss_units(inputs), self.args.world_size)
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._loss_scale = None

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False) -> Any:
        # PaddleNLP's preference trainers take no return_outputs (they never return them).
        extra = {"return_outputs": True} if return_outputs else {}
        out = super().compute_loss(model, inputs, **extra)
        if self._loss_scale is None:
            return out
        return (out[0] * self._loss_scale, out[1]) if return_outputs else out * self._loss_scale

    def create_optimizer(self, lr_scheduler: Any = None) -> Any:
        """PaddleNLP's optimizer, with ftlab's AdamW-mini update (``training.optimizers``)."""
        return use_ftlab_adamw_mini(super().create_optimizer(lr_scheduler))

    def _get_train_sampler(self) -> Any:
        """Same global batches, in the same order, for one process or several."""
        if self.train_dataset is None or not has_length(self.train_dataset):
            return None
        return GlobalBatchSampler(
            self.train_dataset,
            self.args.per_device_train_batch_size,
            num_replicas=max(self.args.dataset_world_size, 1),
            rank=max(self.args.dataset_rank, 0),
            seed=self.args.seed,
            shuffle=self._shuffle,
            drop_last=self.args.dataloader_drop_last,
        )

    def _save_checkpoint(self, model: Any, metrics: Any = None) -> None:
        """Write the checkpoint under ``.staging`` and rename it into place when whole.

        PaddleNLP writes ``checkpoint-N`` in place, so a kill during a save leaves a partial
        directory that ``resume`` would pick up and crash on. Here only complete
        checkpoints ever carry the ``checkpoint-N`` name (``ftlab.record.resume``).
        """
        root = self.args.output_dir
        staging = os.path.join(root, STAGING)
        name = f"checkpoint-{self.state.global_step}"
        rng = state_files.rng_record(self.args.use_hybrid_parallel)  # before saving moves it
        self.args.output_dir = self.args.output_signal_dir = staging
        try:
            super()._save_checkpoint(model, metrics)
            self._unpickle_free(Path(staging) / name, rng)
        except Exception as err:
            if not is_disk_full(err):
                raise
            # The partial save is useless (resume never reads .staging): free its space
            # so that the run's status can still be recorded.
            shutil.rmtree(staging, ignore_errors=True)
            raise DiskFullError(
                disk_full_message(Path(root) / name, self._checkpoint_bytes(Path(root)))
            ) from err
        finally:
            self.args.output_dir = self.args.output_signal_dir = root
        self._best_out_of_staging(Path(staging), Path(root), name)
        if self.args.world_size > 1:
            paddle.distributed.barrier()
        if self.args.process_index <= 0:
            final = os.path.join(root, name)
            if os.path.isdir(final):  # the same step saved again after a resume
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_checkpoints(use_mtime=False, output_dir=root)
        if self.args.world_size > 1:
            paddle.distributed.barrier()

    def _best_out_of_staging(self, staging: Path, root: Path, name: str) -> None:
        """PaddleNLP names the best checkpoint by the path it saved to (``.staging`` here):
        point it at the checkpoint's final place, in memory and in the saved state."""
        best = self.state.best_model_checkpoint
        if best is None or Path(best).parent != staging:
            return
        self.state.best_model_checkpoint = str(root / Path(best).name)
        if self.args.should_save:
            self.state.save_to_json(str(staging / name / "trainer_state.json"))

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """Keep the newest ``save_total_limit`` checkpoints plus the best one.

        PaddleNLP (like Hugging Face) counts the best checkpoint among the N it keeps, so a
        limit of 2 keeps the best and only one recent checkpoint to resume from; ftlab keeps
        N recent ones for resume whatever the best is. -1 keeps every checkpoint.
        """
        limit = self.args.save_total_limit
        if limit is None or limit <= 0 or output_dir is None:
            return
        found = [p for p in Path(output_dir).glob("checkpoint-*") if CHECKPOINT_RE.match(p.name)]
        saved = sorted(found, key=checkpoint_step)
        best = self.state.best_model_checkpoint
        keep = {p.name for p in saved[-limit:]} | ({Path(best).name} if best else set())
        for path in saved:
            if path.name not in keep:
                log.info("deleting %s (train.save_total_limit=%d)", path, limit)
                shutil.rmtree(path, ignore_errors=True)

    def _unpickle_free(self, checkpoint: Path, rng: dict[str, Any]) -> None:
        """Replace PaddleNLP's pickled RNG and scheduler state in ``checkpoint`` by JSON
        (``ftlab.training.checkpoint_state``). fp16 runs keep PaddleNLP's files: their
        loss scaler's state is restored by the same PaddleNLP code as the scheduler's."""
        state_files.write_json(state_files.rng_file(checkpoint, self._rank), rng)
        if self.args.process_index <= 0:
            for pattern in state_files.PADDLE_RNG:
                for f in checkpoint.glob(pattern):
                    f.unlink()
        if self.do_grad_scaling or not self.args.should_save:
            return
        pickled = checkpoint / state_files.PADDLE_SCHEDULER
        if pickled.is_file():
            record = state_files.scheduler_record(self.lr_scheduler)
            state_files.write_json(checkpoint / state_files.SCHEDULER_JSON, record)
            pickled.unlink()

    @property
    def _rank(self) -> int:
        return max(self.args.process_index, 0)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """From ftlab's JSON; a checkpoint without it (written before ftlab wrote JSON) is
        left to PaddleNLP's loader, which unpickles (see docs/reliability.md, Security).

        The choice is made on rank 0's file, the same for every rank: PaddleNLP's loader
        broadcasts, so one rank taking it while the others do not would hang the job. A
        rank the checkpoint has no state for (a resume on more ranks than it was saved
        with) keeps the generators the run's seed gave it, and says so.
        """
        if checkpoint is None or not state_files.rng_file(Path(checkpoint), 0).is_file():
            return super()._load_rng_state(checkpoint)
        path = state_files.rng_file(Path(checkpoint), self._rank)
        if not path.is_file():
            log.warning(
                "%s holds no random state for rank %d (it was saved by fewer ranks): this "
                "rank keeps the generators seeded at the start (train.seed).",
                checkpoint,
                self._rank,
            )
            return
        state_files.restore_rng(
            json.loads(path.read_text()),
            self.args.use_hybrid_parallel,
            self.args.tensor_parallel_degree > 1,
        )

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """PaddleNLP's loader, with the scheduler from ftlab's ``scheduler.json``.

        PaddleNLP loads the optimizer, then insists on its pickled ``scheduler.pdparams``
        and raises when it is missing: that is where ftlab takes over, doing what PaddleNLP
        would have done after it (stop its load timer, offload the optimizer if asked).
        """
        path = Path(checkpoint) / state_files.SCHEDULER_JSON if checkpoint else None
        if path is None or not path.is_file() or self.args.ignore_load_lr_and_optim:
            return super()._load_optimizer_and_scheduler(checkpoint)
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except ValueError as err:
            if "scheduler-file not found" not in str(err):
                raise
            self.runtime_timer.stop()
        self.lr_scheduler.set_state_dict(json.loads(path.read_text()))
        if self.args.offload_optim:
            self._offload_optimizer()

    def _load_from_peft_checkpoint(self, resume_from_checkpoint: str | None = None) -> None:
        """ftlab's safetensors adapter state (VeRA, LoKr), else PaddleNLP's loader.

        PaddleNLP looks for its pickled weights file and, when it is missing, silently
        loads nothing: a resume would train on from fresh adapter weights.
        """
        checkpoint = Path(resume_from_checkpoint) if resume_from_checkpoint else None
        if checkpoint is not None and (checkpoint / ADAPTER_STATE).is_file():
            load_trainable_state(self.model, checkpoint)
            return
        super()._load_from_peft_checkpoint(resume_from_checkpoint)

    def _checkpoint_bytes(self, root: Path) -> int:
        """What one checkpoint takes: the size of the newest saved one, else an estimate
        from the trainable parameters (weights + AdamW's two moments, fp32)."""
        saved = sorted(root.glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
        if saved:
            return dir_bytes(saved[-1])
        trainable = sum(int(p.size) for p in self.model.parameters() if not p.stop_gradient)
        return 3 * 4 * trainable

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        if "loss" in logs and self._tokens:
            elapsed = max(time.perf_counter() - self._interval_start, 1e-9)
            # Counts are this process's; data-parallel ranks see equal-sized batches.
            ranks = max(self.args.dataset_world_size, 1)
            logs["tokens_per_second"] = round(self._tokens * ranks / elapsed, 2)
            logs["effective_tokens_per_second"] = round(self._effective_tokens * ranks / elapsed, 2)
            logs["padding_efficiency"] = round(self._effective_tokens / self._tokens, 4)
            logs["peak_memory_mb"] = round(peak_memory_mb(), 1)
            self._tokens = self._effective_tokens = 0
            self._interval_start = time.perf_counter()
        super().log(logs, **kwargs)


class FtlabTrainer(FtlabTrainerMixin, SFTTrainer):
    """The supervised fine-tuning Trainer."""

    def prediction_pipeline_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        """Evaluate a pipeline model on one eval batch of whatever size it has.

        ``PipelineParallel.eval_batch`` cuts a batch into ``accumulate_steps`` micro-batches
        of the *training* micro-batch size and asserts the batch is exactly that big, so an
        eval batch of another size (``per_device_eval_batch_size``, or the dev set's last,
        shorter batch) would fail. The whole eval batch is one micro-batch here; the loss
        is the same token mean either way.
        """
        size = int(inputs["input_ids"].shape[0])
        saved = model.micro_batch_size, model.accumulate_steps
        model.micro_batch_size, model.accumulate_steps = size, 1
        try:
            return super().prediction_pipeline_step(model, inputs, *args, **kwargs)
        finally:
            model.micro_batch_size, model.accumulate_steps = saved


class LogLastStep(TrainerCallback):
    """Log the last step whatever ``logging_steps`` is.

    PaddleNLP logs every ``logging_steps`` only, so a run shorter than that (or one whose
    length is not a multiple) would end with its last steps unlogged, and a summary
    without any training loss. Runs after PaddleNLP's own flow callback.
    """

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_log = True
        return control


class MetricsJsonl(TrainerCallback):
    """One JSON line per logging event (train step, evaluation, final summary)."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        kind = (
            "eval"
            if any(k.startswith("eval_") for k in logs)
            else ("train" if "loss" in logs else "final")
        )
        line = {"step": state.global_step, "kind": kind}
        line.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        if "loss" in line:
            line["loss"] = float(line["loss"])
        self.run_dir.append_jsonl(METRICS, line)


def write_record(run_dir: RunDir, record: dict[str, Any]) -> None:
    """Write record files: text as is, anything else as JSON."""
    for name, content in record.items():
        if isinstance(content, str):
            run_dir.write_text(name, content)
        else:
            run_dir.write_json(name, content)


class RecordStart(TrainerCallback):
    """The run's record, written when training really starts.

    ``on_train_begin`` comes after PaddleNLP's Trainer has loaded a resume's checkpoint
    (weights, optimizer, scheduler, trainer state), so a resume that fails before that
    leaves the run dir as it was. Then: the resumed run's environment, fingerprints and
    resolved config, the metric lines after the checkpoint dropped (they are logged
    again), an interrupted save's ``.staging`` removed, and ``status.json`` = running.
    """

    def __init__(
        self, run_dir: RunDir, record: dict[str, Any], checkpoint: Path | None = None
    ) -> None:
        self.run_dir, self.record, self.checkpoint = run_dir, record, checkpoint
        self.done = False

    def write(self) -> None:
        if self.done:
            return
        self.done = True
        context = {}
        if self.checkpoint is not None:
            step = checkpoint_step(self.checkpoint)
            dropped = self.run_dir.truncate_metrics(step)
            if self.run_dir.is_main:
                shutil.rmtree(self.run_dir.checkpoints / STAGING, ignore_errors=True)
            write_record(self.run_dir, self.record)
            context = {"resumed_from": str(self.checkpoint)}
            log.info(
                "resumed from %s; %d metric lines after step %d dropped",
                self.checkpoint,
                dropped,
                step,
            )
        mark_running(self.run_dir, context)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.write()


# stage=grpo's logged values shown on the console line (key, format).
REWARD_CONSOLE = (
    ("reward", "reward {:.3f}"),
    ("reward_std", "± {:.3f}"),
    ("kl", "kl {:.4f}"),
    ("completion_length", "len {:.1f}"),
    ("clip_ratio", "clip {:.3f}"),
    ("entropy", "entropy {:.2f}"),
    ("generation_tokens_per_second", "gen {:,.0f} tok/s"),
    ("training_tokens_per_second", "train {:,.0f} tok/s"),
)


class ConsoleProgress(TrainerCallback):
    """One progress bar (a terminal) or one line per logging step (a file or pipe)."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.start = 0.0
        self.first_step = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = None
        self.start, self.first_step = time.perf_counter(), state.global_step
        stream = progress_settings["stream"] or sys.stdout
        if progress_settings["enabled"] and state.is_world_process_zero and stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                file=stream,
                desc="train ",
                # A terminal that reports no size (0 x 0) would get no bar at all.
                ncols=shutil.get_terminal_size().columns or 100,
                nrows=shutil.get_terminal_size().lines or 24,
                bar_format="{desc}{n}/{total} |{bar}| {elapsed}<{remaining}{postfix}",
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        parts = [f"loss {float(logs['loss']):.4f}"]
        if "learning_rate" in logs:
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        if "tokens_per_second" in logs:
            parts.append(f"{float(logs['tokens_per_second']):,.0f} tokens/s")
        if "reward" in logs:  # stage=grpo: what its users watch, on the same line
            parts += [fmt.format(float(logs[k])) for k, fmt in REWARD_CONSOLE if k in logs]
        if self.bar is not None:
            self.bar.set_postfix_str("  ".join(parts), refresh=True)
        elif progress_settings["enabled"]:
            done = state.global_step - self.first_step
            elapsed = time.perf_counter() - self.start
            left = elapsed / done * (state.max_steps - state.global_step) if done else 0.0
            width = len(str(state.max_steps))
            console.info(
                "step   %*d/%d  %s  %s left",
                width,
                state.global_step,
                state.max_steps,
                "  ".join(parts),
                duration(left),
            )

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
