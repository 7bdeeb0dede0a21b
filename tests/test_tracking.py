"""``train.report_to=mlflow``: what the MLflow client reads back of a run and of a sweep,
and a store that cannot be reached (the run goes on, the summary says why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import compose_run
from helpers import run_ftlab_forked
from test_e2e import read_jsonl

from ftlab.config.overrides import flatten
from ftlab.errors import ConfigError
from ftlab.resolve.validate import check_trackers
from ftlab.training.arguments import shared_arguments

TINY = ("train.max_steps=2", "train.logging_steps=1", "eval.demo_metric=false")


def client_for(cwd: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{cwd / 'outputs/mlruns/mlflow.db'}")


def test_mlflow_is_ftlabs_own_callback_not_paddlenlps() -> None:
    """PaddleNLP refuses report_to names it has no callback for: mlflow stays out of the
    TrainingArguments (ftlab adds its own callback) and validation accepts it."""
    run = compose_run(["train.report_to=[visualdl,mlflow]"])
    check_trackers(run)
    assert shared_arguments(run)["report_to"] == ["visualdl"]
    with pytest.raises(ConfigError, match="mlflow needs the mlflow package"):
        check_trackers(run, available=lambda name: name != "mlflow")


def test_long_param_values_are_cut_to_mlflows_limit() -> None:
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from ftlab.training.mlflow_tracker import TRUNCATED, metric_key, params_of

    params = params_of({"a": {"b": "x" * 7000, "c": [1, 2]}, "d": None})
    assert params["a.c"] == "[1, 2]" and params["d"] == "None"
    assert len(params["a.b"]) == MAX_PARAM_VAL_LENGTH and params["a.b"].endswith(TRUNCATED)
    assert metric_key("eval_loss") == "eval_loss" and metric_key("a:b(c)") == "a_b_c_"


def test_a_sweep_is_a_parent_run_with_one_nested_run_per_job(tmp_path: Path) -> None:
    """Two 2-step jobs; the client reads back each job's params (the resolved config
    flattened as ``ftlab-runs --compare`` does), its loss history (= metrics.jsonl), tags,
    artifacts, and that both nest under the sweep's parent run."""
    sweep_dir = tmp_path / "sweep"
    run_ftlab_forked(
        tmp_path,
        "-m",
        *TINY,
        "eval.generation=false",
        "train.report_to=[mlflow]",
        "train.learning_rate=1e-2,2e-2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    client = client_for(tmp_path)
    parent_id = json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"summary.csv", "summary.md"}
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(jobs) == 2
    experiment = client.get_experiment_by_name("ftlab").experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        run_id = summary["tracking"]["mlflow"]["run_id"]
        assert run_id in {c.info.run_id for c in children}
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        config = yaml.safe_load((job / "resolved_config.yaml").read_text())
        expected = {k: str(v) for k, v in flatten(config).items()}
        assert run.data.params == expected
        assert run.data.tags["method"] == "lora" and run.data.tags["stage"] == "sft"
        assert run.data.tags["layout"] == "single" and run.data.tags["model"] == "stories260k"
        commit = json.loads((job / "environment.json").read_text())["ftlab_git"]["commit"]
        assert run.data.tags.get("git_commit") == commit
        losses = [(r["step"], r["loss"]) for r in read_jsonl(job / "metrics.jsonl") if "loss" in r]
        history = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
        assert [s for s, _ in sorted(history)] == [s for s, _ in sorted(losses)] == [1, 2]
        assert [v for _, v in sorted(history)] == pytest.approx([v for _, v in sorted(losses)])
        assert [m.step for m in client.get_metric_history(run_id, "learning_rate")] == [1, 2]
        for key in ("tokens_per_second", "peak_memory_mb", "eval_loss", "final/eval_loss"):
            assert client.get_metric_history(run_id, key), key
        assert client.get_run(run_id).data.metrics["eval_loss"] == pytest.approx(
            summary["eval_loss"], rel=1e-6
        )
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert artifacts == {"resolved_config.yaml", "summary.json"}


def test_an_unreachable_tracking_uri_turns_tracking_off_not_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The discard port: nothing listens. The forked run inherits the environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    proc = run_ftlab_forked(tmp_path, *TINY, "eval.generation=false", "train.report_to=[mlflow]")
    console = proc.stdout + proc.stderr
    said = [line for line in console.splitlines() if "mlflow tracking is off" in line]
    assert len(said) == 1, console[-3000:]
    assert "http://127.0.0.1:9" in said[0]
    (run_dir,) = (tmp_path / "outputs").glob("*/*_stories260k_lora")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert summary["steps"] == 2
    off = summary["tracking"]["mlflow"]
    assert off["uri"] == "http://127.0.0.1:9" and "127.0.0.1" in off["off"]
    assert "mlflow         off" in console
