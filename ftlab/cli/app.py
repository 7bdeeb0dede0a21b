"""The ``ftlab`` command: a Hydra app that composes a run and dispatches it by mode.

``ftlab method=qlora model=llama3 parallel=tp4`` -> composed DictConfig -> typed
``RunConfig`` (``ftlab.resolve.compose``) -> validation and ``Derived`` values
(``ftlab.resolve.validate``) -> plan, export, launch, or training (``ftlab.training``)
-> an experiment directory under ``outputs/``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import shlex
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from ftlab import signals
from ftlab.cli.console import describe_run, job_console, job_line
from ftlab.cli.help import CONF_DIR, check_selected_options, option_advice, register_help_resolver
from ftlab.cli.process_exit import console_script
from ftlab.config import schema
from ftlab.config.cpu_runtime import CPU_LAYERS, choose_mkl_path, read_cpu_info
from ftlab.config.derived import Derived
from ftlab.config.environment import Environment, run_environment
from ftlab.config.overrides import given_value
from ftlab.config.schema import RunConfig
from ftlab.data.splits import resolve_split_files
from ftlab.distributed.launch import (
    die_with_launcher,
    inside_worker,
    launch_workers,
    multi_node_worker,
    needs_launch,
    record_worker,
)
from ftlab.distributed.rendezvous import check_same_config
from ftlab.errors import DataError, FtlabError
from ftlab.methods.catalog import method_schemas
from ftlab.models.loading import check_model_dir
from ftlab.models.weights import refuse_pickles
from ftlab.planning.disk import disk_warning, plan_disk
from ftlab.record import phases
from ftlab.record.resume import (
    RunFinished,
    checkpoint_step,
    latest_complete_checkpoint,
    pick_checkpoint,
    refuse_resume_changes,
    replay_argv,
)
from ftlab.record.rundir import (
    ERROR,
    SUMMARY,
    DiskFullError,
    RunDir,
    check_given_dir,
    disk_full_message,
    is_disk_full,
)
from ftlab.record.status import ATTEMPT_ENV, record_status, started_by_this_attempt
from ftlab.record.summary import Summary
from ftlab.record.sweep import summarize_sweep, sweep_failure
from ftlab.resolve.compose import register_configs, register_resolvers, to_plain_dict, to_run_config
from ftlab.stages.catalog import stage_schemas
from ftlab.training.progress import console

if TYPE_CHECKING:
    from ftlab.planning.report import Decision

log = logging.getLogger("ftlab")

register_configs()
register_resolvers()  # hydra.run.dir reads ${model_label:...} before any job starts
register_help_resolver()


def execute(cfg: DictConfig, run_dir: Path) -> Any:
    """Validate and run one composed config; the sweep runner and tests call this too.

    Returns the run's ``Summary`` (train mode; None when rank 0 ran on another node), or
    the plan / export record.
    """
    # The run path's modules import numpy (about half a second): loaded when a job runs,
    # so ``ftlab --help`` and the error paths start without them.
    from ftlab.interop.paddlenlp_export import export_run_finetune
    from ftlab.planning.plan import layout_estimate, print_plan

    record = RunDir(run_dir)
    resolved = _resolve(cfg, record)
    run, env, derived = resolved.run, resolved.env, resolved.derived
    if run.mode == "train":  # plan and export read no data (it may live on the target)
        _check_data_files(run)
        check_model_dir(run.model)  # a pickled or damaged base: refused before Paddle loads
    if not inside_worker():  # a worker's job was described by its launcher
        console.info(describe_run(run, derived, run_dir))
    signals.install()  # Paddle's import replaced the SIGTERM handler (ftlab.signals)
    record.create()
    phases.mark("compose")
    if run.mode == "plan":
        extra, lines = layout_estimate(run, env, resolved.decision, resolved.notes)
        return print_plan(run, derived, env, record, extra, lines)
    if run.mode == "export":
        return export_run_finetune(run, derived, record)
    return _train_or_launch(cfg, run, derived, record)


@dataclass(frozen=True)
class _Resolved:
    run: RunConfig  # with parallel=auto: the chosen layout written in
    env: Environment  # the machine validated against (this one, or the described target)
    derived: Derived
    decision: Decision | None  # parallel=auto's
    notes: list[str]  # what planning for a described machine assumed


def _resolve(cfg: DictConfig, record: RunDir) -> _Resolved:
    """The typed, validated run and the machine it is validated against. With
    ``parallel=auto`` the layout is chosen here, after composition and before validation,
    which then checks the chosen layout like any other."""
    from ftlab.planning.auto import planning_environment, resolve_auto  # numpy (execute)
    from ftlab.resolve.validate import validate_for

    run = to_run_config(cfg)
    # Before anything imports Paddle: MKL reads its code path once, when it initialises.
    mkl = choose_mkl_path(run.launch.cpu_fast_path, os.environ, read_cpu_info())
    auto = run.parallel.name == "auto"
    notes: list[str] = []
    if auto and run.mode == "plan":
        env, notes = planning_environment(run)
    else:
        # Training validates against this machine; plan and export with device=gpu against
        # the GPU machine the target settings describe, on any machine.
        env = run_environment(run)
    decision = None
    if auto:
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
    derived = validate_for(run, env)
    if derived.cpu_threads is not None:
        derived = derived.with_(
            mkl_path=mkl.describe(),
            cpu_layers=CPU_LAYERS[run.launch.cpu_fast_path],
        )
    if decision is not None:
        derived = derived.with_(auto_layout=decision.chosen.label)
        if run.mode != "plan":  # the plan prints its disk line and warning itself
            _warn_disk(run, derived, env, record.path)
    return _Resolved(run, env, derived, decision, notes)


def _check_data_files(run: RunConfig) -> None:
    """A missing ``data.path`` (or a mixture source's) fails before any heavy work."""
    for data in _datasets(run.data):
        try:
            resolve_split_files(data, "train")
        except DataError as err:
            if not run.data.sources:
                raise
            # A mixture's source, named as the data pipeline names it.
            raise DataError(f"data.sources[{data.name}]: {err}") from None


def _train_or_launch(cfg: DictConfig, run: RunConfig, derived: Derived, record: RunDir) -> Any:
    """Train in this process, or (a multi-process layout) become the launcher of workers."""
    if needs_launch(derived):
        if run.resume:  # a change the checkpoint cannot honour fails before any worker starts
            refuse_resume_changes(record.path, {**to_plain_dict(run), "derived": derived.to_dict()})
        # This process becomes the launcher: Paddle's launcher starts the workers, each
        # re-entering ftlab with the same overrides and this same run dir.
        return launch_workers(run, derived, record)  # rank 0 printed the summary
    if multi_node_worker():
        # Each node composed its own command line: refuse a job whose nodes differ,
        # before any data or model is loaded (ftlab.distributed.rendezvous).
        check_same_config(cfg, run.launch.rendezvous_timeout)
    if run.resume:  # a pickle in the checkpoint to continue from: refused before Paddle loads
        checkpoint, _ = pick_checkpoint(record.path)  # its warnings are printed by the run
        refuse_pickles(checkpoint, run.model.allow_pickle, "checkpoint state")
    from ftlab.training.run import train  # imports Paddle and PaddleNLP: train mode only

    summary = train(run, record, derived)
    if _is_rank_zero():
        console.info(summary.format())
    return summary


def _warn_disk(run: Any, derived: Any, env: Any, run_dir: Path) -> None:
    """parallel=auto: say when the chosen run's checkpoints would not fit the disk."""

    warning = disk_warning(plan_disk(run, derived.world_size, env.described, run_dir))
    if warning and not inside_worker():
        console.warning(warning)


def _datasets(data: Any) -> list[Any]:
    """The dataset settings whose files a run reads: each source of a mixture, else one."""
    from ftlab.data.settings import source_config  # numpy (execute)

    return [source_config(data, src) for src in data.sources] if data.sources else [data]


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
    clean error and a non-zero exit status. A signal ends the run (and a sweep) with
    ``status: interrupted``, the last checkpoint and the command that resumes it.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    started = time.time()
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if not inside_worker():  # workers inherit the attempt of the ftlab process above them
        os.environ[ATTEMPT_ENV] = uuid.uuid4().hex
    try:
        check_selected_options(hydra_cfg.runtime.choices, hydra_cfg.runtime.config_sources)
        with job_console(cfg, run_dir, sweep=sweep, worker=inside_worker()):
            summary = execute(cfg, run_dir)
    except KeyboardInterrupt as err:
        signals.ignore()  # recording takes a moment; a second Ctrl-C must not cut it short
        signum = getattr(err, "signum", signal.SIGINT)
        record_outcome(cfg, run_dir, started, err)
        print(interruption_message(run_dir, signum, cfg.get("resume")), file=sys.stderr)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            summarize_sweep(Path(hydra_cfg.sweep.dir))  # Hydra's end-of-sweep hook won't run
            raise  # the whole sweep stops
        sys.exit(128 + signum)
    except Exception as err:  # noqa: BLE001 - a sweep must survive any failing job
        if is_disk_full(err) and not isinstance(err, DiskFullError):
            err = _disk_full(err, run_dir)
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
    if sweep:
        print(job_line(hydra_cfg.job.num, hydra_cfg.overrides.task, summary, started), flush=True)
    loss = summary.eval_loss if isinstance(summary, Summary) else None
    return float(loss) if loss is not None else None


def _disk_full(err: BaseException, run_dir: Path) -> DiskFullError:
    """A full disk met outside the places that name what they were writing."""
    where = getattr(err, "filename", None) or run_dir
    full = DiskFullError(disk_full_message(Path(where)))
    full.__cause__ = err  # error.txt keeps the original traceback
    return full


def record_outcome(
    cfg: DictConfig, run_dir: Path, started: float, error: BaseException | None = None
) -> None:
    """``status.json`` of this job; the workers of a multi-process run leave it to their
    launching process, which sees every worker's outcome. A resume that ended before its
    training really started (``status.json`` is not this attempt's) records nothing: the
    run's record stays as the run left it."""
    if inside_worker():
        return
    record = RunDir(run_dir)
    if cfg.get("resume") and not started_by_this_attempt(record):
        return
    hydra_cfg = HydraConfig.get()
    context: dict[str, Any] = {
        "mode": cfg.get("mode"),
        "overrides": list(hydra_cfg.overrides.task),
    }
    if hydra_cfg.mode == RunMode.MULTIRUN:
        context["job_num"] = hydra_cfg.job.num
    if isinstance(error, KeyboardInterrupt):
        checkpoint = latest_complete_checkpoint(run_dir)
        context["last_checkpoint"] = str(checkpoint) if checkpoint else None
        context["resume"] = _resume_command(run_dir) if checkpoint else None
    # A failed launch names the failed rank, its host and exit in fields of their own.
    context.update(getattr(error, "status_fields", {}))
    if error is None and record.exists(SUMMARY):  # train.early_stopping_patience ended it
        stopped = record.read_json(SUMMARY).get("stopped_early_at")
        if stopped is not None:
            context["stopped_early_at"] = stopped
    record_status(record, started, error, context)


def _resume_command(run_dir: Path) -> str:
    return "ftlab " + shlex.quote(f"resume={run_dir}")


def interruption_message(run_dir: Path, signum: int, resuming: Any = None) -> str:
    """One line: which signal, the last checkpoint, and how to go on."""
    name = signal.Signals(signum).name
    checkpoint = latest_complete_checkpoint(run_dir)
    if checkpoint is None:
        again = f"ftlab {shlex.quote(f'rerun={run_dir}')}" if not resuming else "the same command"
        return (
            f"ftlab: interrupted by {name} before any checkpoint was saved; start again "
            f"with: {again}"
        )
    return (
        f"ftlab: interrupted by {name}; last checkpoint: {checkpoint} (step "
        f"{checkpoint_step(checkpoint)}). Resume with: {_resume_command(run_dir)}"
    )


def explain_composition_error(err: BaseException) -> str:
    """Hydra's message plus the closest valid names, for keys and group options."""
    text = str(err).strip()
    cause = err.__cause__
    if cause is not None and str(cause) not in text:
        text += "\n" + str(cause).strip()
    # Hydra's hints that do not apply to ftlab's typed configs (appending keys to a
    # schema fails anyway) or only add noise.
    text = re.sub(r"\nTo append to your config use \S+", "", text)
    text = re.sub(r"\nConfig search path:(\n\t.*)+", "", text)
    missing_option = re.search(r"Could not find '(\w+)/([\w.-]+)'", text)
    if missing_option:
        return option_advice(*missing_option.groups()) or text
    key_err = re.search(r"Key '(\w+)' not in '(\w+)'", text)
    if key_err:
        key, type_name = key_err.groups()
        fields = _schema_fields(type_name)
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.4)
        hint = f"Closest valid keys: {', '.join(close)}." if close else ""
        return f"{text}\nValid keys: {', '.join(fields)}.\n{hint}".strip()
    return text


def _schema_fields(type_name: str) -> list[str]:
    candidates = {c.__name__: c for c in (*method_schemas().values(), *stage_schemas().values())}
    candidates.update({n: getattr(schema, n) for n in dir(schema)})
    cls = candidates.get(type_name)
    if cls is None or not dataclasses.is_dataclass(cls):
        return []
    return sorted(f.name for f in dataclasses.fields(cls))


# Hydra options after which nothing runs (no run dir is made or written).
_NO_RUN_FLAGS = ("-h", "--help", "--hydra-help", "-i", "--info", "-c", "--cfg", "--version")
_NO_RUN_FLAGS += ("-sc", "--shell-completion")


def check_given_dirs(argv: list[str]) -> None:
    """An explicit ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``), checked before Hydra
    writes into it: writable, and holding no other run's results unless resumed."""
    if inside_worker() or any(a.split("=", 1)[0] in _NO_RUN_FLAGS for a in argv):
        return
    multirun = bool({"-m", "--multirun"} & set(argv)) or given_value(argv, "hydra.mode") == (
        "MULTIRUN"
    )
    given = given_value(argv, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    if given is not None:
        resuming = given_value(argv, "resume") is not None
        check_given_dir(Path(given), sweep=multirun, reuse=resuming)


def _ftlab_cause(err: BaseException) -> FtlabError | None:
    """The ftlab error behind a Hydra or OmegaConf one (a resolver such as ``new_dir``)."""
    seen = 0
    cause: BaseException | None = err
    while cause is not None and seen < 10:
        if isinstance(cause, FtlabError):
            return cause
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def main() -> None:
    """Console entry point: every user error, signal and full disk ends in one line."""
    phases.mark("import")
    signals.install()
    die_with_launcher()  # a worker whose launcher is gone must not train on
    record_worker()  # its job rank, host and pid, for its node's launcher (several nodes)
    # Let composition errors reach us instead of Hydra printing a stripped traceback, so
    # the message can name the closest valid keys.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        argv = replay_argv(sys.argv[1:])
        check_given_dirs(argv)
        sys.argv = [sys.argv[0], *argv]
        if "--hydra-help" in sys.argv:
            # Hydra composes its own help without train.yaml, so ftlab's text is chosen here.
            sys.argv.append("hydra/hydra_help=ftlab")
        hydra_main()
        failure = sweep_failure()
        if failure is not None:
            raise failure
    except RunFinished as err:
        print(f"ftlab: {err}", flush=True)
        sys.exit(0)
    except (HydraException, OmegaConfBaseException) as err:
        cause = _ftlab_cause(err)
        if cause is not None:
            print(f"ftlab: error: {cause}", file=sys.stderr)
        else:
            print(f"ftlab: config error: {explain_composition_error(err)}", file=sys.stderr)
        sys.exit(2)
    except FtlabError as err:
        print(f"ftlab: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))
    except KeyboardInterrupt as err:  # a sweep stopped, or a signal before any job ran
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"ftlab: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        sys.exit(128 + signum)
    except OSError as err:
        if not is_disk_full(err):
            raise
        print(f"ftlab: error: {_disk_full(err, Path.cwd())}", file=sys.stderr)
        sys.exit(2)


# The console script (pyproject.toml): ends without interpreter teardown (process_exit).
console_main = console_script(main)

if __name__ == "__main__":
    main()
