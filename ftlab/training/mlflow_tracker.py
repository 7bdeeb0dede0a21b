"""``train.report_to=mlflow``: one MLflow run per ftlab run, a parent run per ``-m`` sweep.

PaddleNLP 3.0.0b4 has no MLflow integration (``trainer/integrations.py`` knows visualdl,
wandb, tensorboard, autonlp), so this is one small ``TrainerCallback`` over the ``mlflow``
client (``MlflowClient``: explicit run ids, no process-global active run, so sweep jobs
in one process never mix). What it records:

* params: the resolved config (``resolved_config.yaml``, derived values included),
  flattened to dotted keys exactly as ``ftlab-runs --compare`` flattens it. MLflow keeps
  at most ``MAX_PARAM_VAL_LENGTH`` (6000) characters per value: a longer value is cut
  and ends in ``TRUNCATED``; the whole file is an artifact of the run;
* tags: method, stage, layout, model, git commit, run dir;
* metrics: every ``Trainer.log`` (loss, learning rate, tokens/s, peak memory, eval
  metrics, BLEU/ROUGE, entity recall) at its step, and the final scalars;
* artifacts: ``resolved_config.yaml``, ``summary.json``, ``plan.json`` where present.

Where: ``MLFLOW_TRACKING_URI`` when set, else a local store under ``outputs/mlruns``
(``sqlite:///outputs/mlruns/mlflow.db``, artifacts in ``outputs/mlruns/artifacts``). MLflow
3.x refuses its plain file store (``./mlruns``) unless ``MLFLOW_ALLOW_FILE_STORE=true``
("maintenance mode"), so the default is the SQLite store MLflow recommends; a ``file:``
URI still works with that variable set. A store that cannot be reached does not stop the
run: the console says once that tracking is off, and ``summary.json`` records why.

A sweep job (its run dir sits in a sweep dir, beside Hydra's ``multirun.yaml``) opens
its run nested under the sweep's parent run; the first job creates the parent (under a
file lock: joblib jobs start together) and ``SweepSummary`` closes it after the last job
with the sweep's ``summary.csv``/``summary.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from paddlenlp.trainer import TrainerCallback

from ftlab import console
from ftlab.config.overrides import flatten
from ftlab.record.rundir import (
    ENVIRONMENT,
    MLFLOW_PARENT,
    MLFLOW_RUN,
    PLAN,
    RESOLVED_CONFIG,
    SUMMARY,
    RunDir,
    write_json_atomic,
)

DEFAULT_STORE = Path("outputs") / "mlruns"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "ftlab"
SWEEP_MARKER = "multirun.yaml"  # Hydra writes it into every sweep dir
TRUNCATED = "...TRUNCATED"
# A store that does not answer: how long the first request may take before tracking is
# off (MLflow's own default retries an HTTP request for minutes).
PROBE_RETRIES, PROBE_TIMEOUT_S = "0", "10"
ARTIFACTS = (RESOLVED_CONFIG, SUMMARY, PLAN)


def tracking_uri() -> tuple[str, str | None]:
    """(tracking URI, artifact root for a new experiment; None: the store decides)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    store = DEFAULT_STORE.resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}", str(store / "artifacts")


def open_client(uri: str, artifacts: str | None) -> tuple[Any, str]:
    """A client and the experiment id, created when new; raises when the store fails."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)
    with _quick_requests():
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return client, experiment.experiment_id
        try:
            return client, client.create_experiment(name, artifact_location=artifacts)
        except Exception:  # noqa: BLE001 - another sweep job created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return client, experiment.experiment_id


@contextlib.contextmanager
def _quick_requests() -> Iterator[None]:
    """One try with a short timeout while probing, unless the user set MLflow's own."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": PROBE_RETRIES}
    names["MLFLOW_HTTP_REQUEST_TIMEOUT"] = PROBE_TIMEOUT_S
    set_here = [n for n in names if n not in os.environ]
    for n in set_here:
        os.environ[n] = names[n]
    try:
        yield
    finally:
        for n in set_here:
            os.environ.pop(n, None)


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, values cut to MLflow's limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out = {}
    for key, value in flatten(config).items():
        text = str(value)
        if len(text) > MAX_PARAM_VAL_LENGTH:
            text = text[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        out[key] = text
    return out


_METRIC_KEY = re.compile(r"[^\w\-. /]")


def metric_key(name: str) -> str:
    """A log key as an MLflow metric name (letters, digits, ``_-. /`` only)."""
    return _METRIC_KEY.sub("_", name)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class MlflowTracker(TrainerCallback):
    """One ftlab run's MLflow run; every failure turns tracking off once, never the run."""

    def __init__(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        self.client: Any = None
        self.run_id: str | None = None
        self.uri, artifacts = tracking_uri()
        self.status: dict[str, Any] = {"uri": self.uri}
        try:
            self.client, experiment = open_client(self.uri, artifacts)
            self.run_id = self._open_run(experiment)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.off(err)
            return
        self.status.update(run_id=self.run_id, experiment_id=experiment)
        _OPEN.append(self)

    # ------------------------------------------------------------------ the run

    def _open_run(self, experiment: str) -> str:
        from mlflow.entities import RunStatus

        if self.run_dir.exists(MLFLOW_RUN):  # a resume continues the run it started
            run_id = self.run_dir.read_json(MLFLOW_RUN)["run_id"]
            self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return run_id
        tags = {"ftlab.run_dir": str(self.run_dir.path.resolve())}
        parent = sweep_parent(self.run_dir.path, self.client, experiment)
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(experiment, tags=tags, run_name=self.run_dir.path.name)
        self.run_dir.write_json(MLFLOW_RUN, {"run_id": run.info.run_id, "uri": self.uri})
        return run.info.run_id

    def off(self, err: BaseException) -> None:
        """Tracking ends for this run: said once on the console, recorded in the summary."""
        if self.status.get("off"):
            return
        self.status["off"] = _describe(err)
        self.client = None
        console.warning(
            "mlflow tracking is off for this run (%s): %s. Training goes on; "
            "metrics.jsonl has every metric.",
            self.uri,
            self.status["off"],
        )

    def _call(self, fn: str, *args: Any, **kwargs: Any) -> None:
        if self.client is None:
            return
        try:
            getattr(self.client, fn)(self.run_id, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - a store that fails mid-run ends tracking
            self.off(err)

    def log_metrics(self, step: int, values: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key(k), float(v), now, int(step))
            for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if metrics:
            self._call("log_batch", metrics=metrics)

    # ------------------------------------------------------------------ callback

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.client is None:
            return
        config = self.run_dir.read_yaml(RESOLVED_CONFIG) or {}
        params = params_of(config)
        from mlflow.entities import Param, RunTag

        existing = self.client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 params per batch
            self._call("log_batch", params=new[i : i + 100])
        tags = [RunTag(k, v) for k, v in run_tags(config, self.run_dir).items()]
        self._call("log_batch", tags=tags)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero and logs:
            self.log_metrics(state.global_step, logs)

    def finish(self, failed: bool = False) -> None:
        """Artifacts and the run's end status (after ``summary.json`` is written)."""
        from mlflow.entities import RunStatus

        if self in _OPEN:
            _OPEN.remove(self)
        for name in ARTIFACTS:
            if self.run_dir.exists(name):
                self._call("log_artifact", str(self.run_dir.path / name))
        self._call(
            "set_terminated",
            status=RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED),
        )


_OPEN: list[MlflowTracker] = []  # runs of this process not yet ended


def close_open_runs() -> None:
    """End the runs of this process that training left open, as FAILED."""
    for tracker in list(_OPEN):
        tracker.finish(failed=True)


def run_tags(config: dict[str, Any], run_dir: RunDir) -> dict[str, str]:
    """method, stage, layout, model and the ftlab commit of a run."""
    get = lambda *keys: _dig(config, keys)  # noqa: E731
    layout = get("derived", "auto_layout") or get("parallel", "name")
    commit = None
    if run_dir.exists(ENVIRONMENT):
        commit = (run_dir.read_json(ENVIRONMENT).get("ftlab_git") or {}).get("commit")
    tags = {
        "method": get("method", "name"),
        "stage": get("stage", "name"),
        "layout": layout,
        "model": get("model", "name"),
        "mlflow.source.git.commit": commit,
        "git_commit": commit,
    }
    return {k: str(v) for k, v in tags.items() if v is not None}


def _dig(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(tree, dict):
            return None
        tree = tree.get(key)
    return tree


# --------------------------------------------------------------------------- sweeps


def sweep_dir_of(run_dir: Path) -> Path | None:
    """The sweep dir a job's run dir sits in (None for a single run)."""
    parent = run_dir.resolve().parent
    return parent if (parent / SWEEP_MARKER).exists() else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sweep_parent(run_dir: Path, client: Any, experiment: str) -> str | None:
    """The sweep's parent run id, created by the sweep's first job (None outside a sweep)."""
    sweep = sweep_dir_of(run_dir)
    if sweep is None:
        return None
    record = sweep / MLFLOW_PARENT
    with _locked(sweep / (MLFLOW_PARENT + ".lock")):
        if record.exists():
            return json.loads(record.read_text())["run_id"]
        run = client.create_run(
            experiment,
            tags={"ftlab.sweep_dir": str(sweep), "ftlab.kind": "sweep"},
            run_name=f"sweep {sweep.name}",
        )
        write_json_atomic(record, {"run_id": run.info.run_id, "uri": client.tracking_uri})
        return run.info.run_id


def finish_sweep(sweep_dir: Path, files: list[Path]) -> None:
    """Close a sweep's parent run with the sweep summary files (no parent: nothing)."""
    record = sweep_dir / MLFLOW_PARENT
    if not record.exists():
        return
    parent = json.loads(record.read_text())
    try:
        from mlflow.entities import RunStatus
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=parent["uri"])
        with _quick_requests():
            for path in files:
                if path.exists():
                    client.log_artifact(parent["run_id"], str(path))
            client.set_terminated(parent["run_id"], status=RunStatus.to_string(RunStatus.FINISHED))
    except Exception as err:  # noqa: BLE001 - the sweep's own summary is already written
        console.warning("mlflow: the sweep's parent run was not closed: %s", _describe(err))
