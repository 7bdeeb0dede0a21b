"""The ``ftlab`` command: a Hydra app that composes a run and dispatches it by mode.

``ftlab method=qlora model=llama3 parallel=tp4`` -> composed DictConfig -> typed
``RunConfig`` (``ftlab.resolve.compose``) -> validation and ``Derived`` values
(``ftlab.resolve.validate``) -> plan, export, launch, or training (``ftlab.training``)
-> an experiment directory under ``outputs/``.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ftlab.errors import FtlabError
from ftlab.record.rundir import ERROR, RunDir
from ftlab.record.status import record_status
from ftlab.record.summary import Summary
from ftlab.resolve.compose import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
log = logging.getLogger("ftlab")

register_configs()


def execute(cfg: DictConfig, run_dir: Path) -> Any:
    """Validate and run one composed config; the sweep runner and tests call this too.

    Returns the run's ``Summary`` (train mode; None when rank 0 ran on another node), or
    the plan / export record.
    """
    from ftlab.config.environment import probe_environment
    from ftlab.resolve.compose import to_run_config
    from ftlab.resolve.validate import validate

    run = to_run_config(cfg)
    record = RunDir(run_dir)
    auto = run.parallel.name == "auto"
    notes: list[str] = []
    if run.mode == "plan":
        from ftlab.planning.auto import planning_environment
        from ftlab.planning.plan import plan_environment

        # device=gpu plans for GPUs on any machine.
        env, notes = planning_environment(run) if auto else (plan_environment(run), [])
    else:
        env = probe_environment(run.device)
    decision = None
    if auto:
        # The degrees are chosen after composition and before validation, which then
        # checks the chosen layout like any other.
        from ftlab.distributed.launch import inside_worker
        from ftlab.planning.auto import resolve_auto

        worker = inside_worker()
        run, decision = resolve_auto(
            run,
            env,
            record,
            overrides=_task_overrides(),
            reuse=worker or run.resume is not None,  # the launcher's (or first run's) choice
            notes=notes,
            quiet=worker or run.mode == "plan",  # the plan prints it
        )
    derived = validate(run, env)
    if decision is not None:
        derived = derived.with_(auto_layout=decision.chosen.label)
    record.create()
    if run.mode == "plan":
        from ftlab.planning.auto import layout_estimate
        from ftlab.planning.plan import print_plan

        extra, lines = layout_estimate(run, env, decision, notes)
        return print_plan(run, derived, env, record, extra, lines)
    if run.mode == "export":
        from ftlab.planning.export import export_run_finetune

        return export_run_finetune(run, derived, record)
    from ftlab.distributed.launch import launch_workers, needs_launch

    if needs_launch(derived):
        # This process becomes the launcher: Paddle's launcher starts the workers, each
        # re-entering ftlab with the same overrides and this same run dir.
        summary = launch_workers(run, derived, record)
    else:
        from ftlab.training.stages import train

        summary = train(run, record, derived)
    if summary is not None and _is_rank_zero():
        print(summary.format(), flush=True)
    return summary


def _task_overrides() -> list[str]:
    """This job's command-line overrides (empty outside a Hydra app, e.g. in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _is_rank_zero() -> bool:
    import paddle.distributed as dist

    return dist.get_rank() <= 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """One job; returns the eval loss (the objective of an Optuna sweep).

    In a sweep (``-m``) a failing job is recorded (``status.json``, ``error.txt``) and
    logged, and the sweep goes on with its next job; a single run still ends with a
    clean error and a non-zero exit status.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    started = time.time()
    try:
        summary = execute(cfg, run_dir)
    except Exception as err:  # noqa: BLE001 - a sweep must survive any failing job
        record_outcome(cfg, run_dir, started, err)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(err, FtlabError):
                print(f"ftlab: error: {err}", file=sys.stderr, flush=True)
                sys.exit(2)
            raise
        log.error(
            "job %s failed: %s: %s (traceback in %s)",
            hydra_cfg.job.num,
            type(err).__name__,
            err,
            run_dir / ERROR,
        )
        return None
    record_outcome(cfg, run_dir, started)
    loss = summary.eval_loss if isinstance(summary, Summary) else None
    return float(loss) if loss is not None else None


def record_outcome(
    cfg: DictConfig, run_dir: Path, started: float, error: BaseException | None = None
) -> None:
    """``status.json`` of this job; the workers of a multi-process run leave it to their
    launching process, which sees every worker's outcome."""
    from ftlab.distributed.launch import inside_worker

    if inside_worker():
        return
    hydra_cfg = HydraConfig.get()
    context = {"mode": cfg.get("mode"), "overrides": list(hydra_cfg.overrides.task)}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        context["job_num"] = hydra_cfg.job.num
    record_status(RunDir(run_dir), started, error, context)


def explain_composition_error(err: BaseException) -> str:
    """Hydra's message plus the closest valid names, for keys and group options."""
    from ftlab.config.choices import suggest

    text = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause) not in text:
        text += "\n" + str(cause).strip()
    # Hydra's hints that do not apply to ftlab's typed configs (appending keys to a
    # schema fails anyway) or only add noise.
    text = re.sub(r"\nTo append to your config use \S+", "", text)
    text = re.sub(r"\nConfig search path:(\n\t.*)+", "", text)
    text = re.sub(r"\n\tbase_\w+", "", text)  # schemas, not options a user picks
    missing_option = re.search(r"Could not find '(\w+)/([\w.-]+)'", text)
    if missing_option:
        group, option = missing_option.groups()
        options = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        return f"{text}\n{suggest(option, options).strip()}".strip()
    key_err = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    if key_err:
        key, type_name = key_err.groups()
        fields = _schema_fields(type_name)
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.4)
        hint = f"Closest valid keys: {', '.join(close)}." if close else ""
        return f"{text}\nValid keys: {', '.join(fields)}.\n{hint}".strip()
    return text


def _schema_fields(type_name: str) -> list[str]:
    import dataclasses

    from ftlab.config import schema
    from ftlab.methods.catalog import method_schemas

    candidates = {c.__name__: c for c in method_schemas().values()}
    candidates.update({n: getattr(schema, n) for n in dir(schema)})
    cls = candidates.get(type_name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return sorted(f.name for f in dataclasses.fields(cls))


def main() -> None:
    """Console entry point: turn composition errors into one readable message."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Let composition errors reach us instead of Hydra printing a stripped traceback, so
    # the message can name the closest valid keys.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        from ftlab.record.resume import replay_argv

        sys.argv = [sys.argv[0], *replay_argv(sys.argv[1:])]
        hydra_main()
    except (HydraException, OmegaConfBaseException) as err:
        print(f"ftlab: config error: {explain_composition_error(err)}", file=sys.stderr)
        sys.exit(2)
    except FtlabError as err:
        print(f"ftlab: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
