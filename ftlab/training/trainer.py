"""PaddleNLP's Trainer, plus the measurements ftlab records at every logging step.

PaddleNLP logs loss, learning rate and samples/s. It does not count tokens (let alone
non-padding tokens, which is what packing improves) and reports no CPU peak memory, so
``FtlabTrainer`` counts the tokens of each batch it trains on and adds throughput and
peak memory to the logs before PaddleNLP's callbacks (VisualDL included) see them. The
same dict goes to ``metrics.jsonl`` through ``MetricsJsonl``.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import paddle
from paddlenlp.trainer import TrainerCallback
from paddlenlp.trainer.trainer_utils import has_length
from paddlenlp.trl import SFTTrainer

from ftlab.distributed.batching import GlobalBatchSampler, global_token_scale
from ftlab.record.resume import STAGING
from ftlab.record.rundir import METRICS, RunDir
from ftlab.training.memory import peak_memory_mb
from ftlab.training.progress import console, duration, progress_settings


class FtlabTrainer(SFTTrainer):
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

    def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        total, effective = self._count_tokens(inputs)
        self._tokens += total
        self._effective_tokens += effective
        # Several ranks: weight each rank's loss by its share of the global batch's target
        # tokens (ftlab.distributed.batching); pipeline layouts compute their loss elsewhere.
        if self.args.world_size > 1 and self.args.pipeline_parallel_degree <= 1:
            self._loss_scale = global_token_scale(inputs["labels"], self.args.world_size)
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._loss_scale = None

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False) -> Any:
        out = super().compute_loss(model, inputs, return_outputs=return_outputs)
        if self._loss_scale is None:
            return out
        return (out[0] * self._loss_scale, out[1]) if return_outputs else out * self._loss_scale

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
        self.args.output_dir = self.args.output_signal_dir = staging
        try:
            super()._save_checkpoint(model, metrics)
        finally:
            self.args.output_dir = self.args.output_signal_dir = root
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
