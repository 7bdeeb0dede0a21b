"""The ``ftlab`` command: a Hydra app that composes a run and trains it.

``ftlab method=qlora model=llama3 parallel=tp4`` -> composed DictConfig -> typed
``RunConfig`` (``ftlab.config.load``) -> validation (``ftlab.config.validate``) -> the run
(``ftlab.runner``) -> an experiment directory under ``outputs/``.
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

from ftlab.config.store import register_configs
from ftlab.errors import FtlabError
from ftlab.run.status import ERROR_FILE, record_status

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
log = logging.getLogger("ftlab")

register_configs()


def execute(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Validate and run one composed config; the sweep runner and tests call this too."""
    from ftlab.config.load import to_run_config
    from ftlab.config.validate import probe_environment, validate

    run = to_run_config(cfg)
    if run.mode == "plan":
        from ftlab.plan import plan_environment

        env = plan_environment(run)  # device=gpu plans for GPUs on any machine
    else:
        env = probe_environment(run.device)
    derived = validate(run, env)
    run_dir.mkdir(parents=True, exist_ok=True)
    if run.mode == "plan":
        from ftlab.plan import print_plan

        return print_plan(run, derived, env, run_dir)
    if run.mode == "export":
        from ftlab.export import export_run_finetune

        return export_run_finetune(run, derived, run_dir)
    from ftlab.launch import launch_workers, needs_launch

    if needs_launch(derived):
        # This process becomes the launcher: Paddle's launcher starts the workers, each
        # re-entering ftlab with the same overrides and this same run dir.
        return launch_workers(run, derived, run_dir)
    from ftlab.runner import train

    summary = train(run, run_dir, derived)
    if summary.get("is_main", True):
        print_summary(summary)
    return summary


def print_summary(s: dict[str, Any]) -> None:
    def fmt(v: Any, spec: str = ".4f") -> str:
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"run dir        {s['run_dir']}",
        f"loss           {fmt(s['first_loss'])} -> {fmt(s['final_loss'])} "
        f"(eval {fmt(s['eval_loss'])}, ppl {fmt(s['eval_ppl'], '.2f')})",
        f"entity recall  base {fmt(s['entity_recall_base'], '.3f')} -> "
        f"fine-tuned {fmt(s['entity_recall'], '.3f')}",
        f"throughput     {fmt(s['tokens_per_second'], '.0f')} tokens/s "
        f"({fmt(s['effective_tokens_per_second'], '.0f')} non-padding)",
        f"peak memory    {fmt(s['peak_memory_mb'], '.0f')} MiB",
        f"trainable      {s['parameters']['trainable']:,} of {s['parameters']['total']:,} params",
        f"time           train {s['train_seconds']:.1f} s, run {s['wall_seconds']:.1f} s",
    ]
    print("\n".join(["", "ftlab summary", *("  " + x for x in lines)]), flush=True)


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
            run_dir / ERROR_FILE,
        )
        return None
    record_outcome(cfg, run_dir, started)
    loss = summary.get("eval_loss") if summary else None
    return float(loss) if loss is not None else None


def record_outcome(
    cfg: DictConfig, run_dir: Path, started: float, error: BaseException | None = None
) -> None:
    """``status.json`` of this job; the workers of a multi-process run leave it to their
    launching process, which sees every worker's outcome."""
    from ftlab.launch import inside_worker

    if inside_worker():
        return
    hydra_cfg = HydraConfig.get()
    context = {"mode": cfg.get("mode"), "overrides": list(hydra_cfg.overrides.task)}
    if hydra_cfg.mode == RunMode.MULTIRUN:
        context["job_num"] = hydra_cfg.job.num
    record_status(run_dir, started, error, context)


def explain_composition_error(err: BaseException) -> str:
    """Hydra's message plus the closest valid names, for keys and group options."""
    from ftlab.config.validate import suggest

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
    from ftlab.methods import method_schemas

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
        from ftlab.run.resume import replay_argv

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
