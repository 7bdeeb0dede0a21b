"""Trackers (``train.report_to``): PaddleNLP's own callbacks, each writing into the run dir.

PaddleNLP's Trainer builds a callback per ``report_to`` entry and hands every ``log``
call to it, so the scalars ftlab adds in ``FtlabTrainer.log`` (tokens/s, padding
efficiency, peak memory, task metrics) reach every tracker as they reach ``metrics.jsonl``.
What ftlab adds here is where each one writes: VisualDL into ``<run>/visualdl`` (the
Trainer's ``logging_dir``), TensorBoard into ``<run>/tensorboard`` (PaddleNLP's callback
would share VisualDL's directory), and Weights & Biases as an *offline* run under
``<run>/wandb`` (nothing leaves the machine; ``wandb sync <run>/wandb/offline-run-*``
uploads it later). MLflow has no PaddleNLP callback: ``ftlab.training.mlflow_tracker`` is
ftlab's own, added here. Scalars computed after training (final evaluation, task metrics)
are written by ``write_final_scalars``: the callbacks close their writers when training
ends.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ftlab.record.rundir import TENSORBOARD, RunDir

FINAL_TENSORBOARD_SUFFIX = ".final"


def attach_trackers(trainer: Any, run_dir: RunDir, report_to: Sequence[str]) -> None:
    """Point PaddleNLP's tracker callbacks at the run dir (rank 0 only writes)."""
    if not run_dir.is_main:
        return
    if "mlflow" in report_to:
        from ftlab.training.mlflow_tracker import MlflowTracker

        trainer.add_callback(MlflowTracker(run_dir))
    if "tensorboard" in report_to:
        from paddlenlp.trainer.integrations import TensorBoardCallback
        from tensorboardX import SummaryWriter

        logdir = str(run_dir / TENSORBOARD)

        def writer(log_dir: str | None = None) -> Any:
            # The callback opens a writer on the Trainer's logging_dir (VisualDL's), also
            # again for logs after training; every one of them opens here instead.
            return SummaryWriter(logdir=logdir)

        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):
                cb._SummaryWriter = writer
    if "wandb" in report_to:
        import wandb

        # PaddleNLP's WandbCallback reuses a run that exists (``wandb.run``) and only adds
        # the config; starting it here puts it in offline mode, inside the run dir.
        os.environ["WANDB_MODE"] = "offline"
        if wandb.run is None:
            wandb.init(
                project=os.getenv("WANDB_PROJECT", "ftlab"),
                name=run_dir.path.name,
                dir=str(run_dir.path),
                mode="offline",
            )


def mlflow_tracker(trainer: Any) -> Any:
    """The run's MLflow callback (None without ``report_to=mlflow`` or off rank 0)."""
    from ftlab.training.mlflow_tracker import MlflowTracker

    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, MlflowTracker)]
    return found[0] if found else None


def tracking_status(trainer: Any, report_to: Sequence[str]) -> dict[str, Any]:
    """What ``summary.json`` records of the trackers that can be off (MLflow's store)."""
    tracker = mlflow_tracker(trainer) if "mlflow" in report_to else None
    return {"mlflow": dict(tracker.status)} if tracker is not None else {}


def finish_trackers(trainer: Any, report_to: Sequence[str], failed: bool = False) -> None:
    """Close the trackers that outlive ``train()``: MLflow's run gets the record files."""
    tracker = mlflow_tracker(trainer) if "mlflow" in report_to else None
    if tracker is not None:
        tracker.finish(failed)


def close_open_trackers() -> None:
    """End, as failed, the MLflow runs this process left open (a run that raised)."""
    import sys

    module = sys.modules.get("ftlab.training.mlflow_tracker")
    if module is not None:
        module.close_open_runs()


def write_final_scalars(
    run_dir: RunDir,
    step: int,
    scalars: dict[str, list[tuple[int, float]]],
    report_to: Sequence[str],
    trainer: Any = None,
) -> None:
    """Post-training scalars to every tracker of the run (``scalars``: tag -> points)."""
    if not run_dir.is_main:
        return
    if "visualdl" in report_to:
        run_dir.write_final_scalars(step, scalars)
    if "tensorboard" in report_to:
        from tensorboardX import SummaryWriter

        with SummaryWriter(
            logdir=str(run_dir / TENSORBOARD), filename_suffix=FINAL_TENSORBOARD_SUFFIX
        ) as writer:
            for tag, points in scalars.items():
                for at, value in points:
                    writer.add_scalar(tag, float(value), at)
    tracker = mlflow_tracker(trainer) if trainer is not None and "mlflow" in report_to else None
    if tracker is not None:
        for tag, points in scalars.items():
            for at, value in points:
                tracker.log_metrics(at, {tag: value})
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            for tag, points in scalars.items():
                for at, value in points:
                    wandb.log({tag: float(value), "train/global_step": at})
            wandb.finish()
