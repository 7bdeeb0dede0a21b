"""The best checkpoint, early stopping and ``save_total_limit``: settings refused before any
work, and real runs on the shipped model whose eval loss rises after step 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF_DIR, CPU, compose_run
from helpers import run_ftlab_forked
from test_e2e import read_jsonl

from ftlab.cli.runs import main as runs_main
from ftlab.errors import ConfigError
from ftlab.interop.paddlenlp_export import run_finetune_arguments
from ftlab.interop.paddlenlp_import import BEST_KEYS, import_arguments, script_defaults
from ftlab.resolve.validate import validate
from ftlab.training.arguments import setting

EVERY_STEP = ("train.eval_steps=1", "train.save_steps=1")
# Constant lr 0.02 on the shipped model and demo data: the eval loss falls at step 2
# (1.895 -> 1.488) and rises after it (1.853, 2.442): the best checkpoint is step 2.
RISING = (
    "train.lr_scheduler_type=constant",
    "train.warmup_steps=0",
    "train.learning_rate=0.02",
    "train.logging_steps=1",
    "eval.demo_metric=false",
    "eval.generation=false",
)


def refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate(compose_run(list(overrides)), CPU)
    return str(err.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ("train.metric_for_best_model=los", *EVERY_STEP),
            "train.metric_for_best_model=los: not a metric the run's evaluations compute (did "
            "you mean loss?); they compute loss, ppl",
        ),
        (
            ("train.metric_for_best_model=bleu4", *EVERY_STEP),
            "ftlab computes bleu4 once, after training, so it cannot rank checkpoints; "
            "evaluations during training compute loss, ppl",
        ),
        (
            ("stage=dpo", "train.metric_for_best_model=eval_ppl", *EVERY_STEP),
            "evaluations compute no ppl; they compute loss",
        ),
        (
            ("train.early_stopping_patience=2", "train.load_best_model_at_end=true"),
            "train.early_stopping_patience=2 needs evaluations during training, but "
            "train.eval_steps=0 evaluates only once",
        ),
        (
            ("train.early_stopping_patience=2", *EVERY_STEP),
            "needs train.load_best_model_at_end=true",
        ),
        (
            ("train.load_best_model_at_end=true", "train.eval_steps=2", "train.save_steps=3"),
            "train.save_steps=3 must be a multiple of train.eval_steps=2",
        ),
        (
            ("train.metric_for_best_model=ppl", "train.greater_is_better=true", *EVERY_STEP),
            "a lower ppl is better",
        ),
        (("train.save_total_limit=0",), "train.save_total_limit=0: keep at least 1 checkpoint"),
        (
            ("method=vera", "train.load_best_model_at_end=true", *EVERY_STEP),
            "method=vera: the method saves its own checkpoint state",
        ),
        (("train.early_stopping_threshold=-1",), "train.early_stopping_threshold=-1.0: must be"),
    ],
)
def test_bad_settings_are_refused_in_one_line(overrides: tuple[str, ...], expected: str) -> None:
    message = refused(*overrides)
    assert expected in message and "\n" not in message


def test_the_direction_is_derived_and_recorded() -> None:
    run = compose_run(["train.metric_for_best_model=eval_ppl", *EVERY_STEP])
    derived = validate(run, CPU)
    assert (derived.metric_for_best_model, derived.greater_is_better) == ("eval_ppl", False)
    run = compose_run(["train.load_best_model_at_end=true", *EVERY_STEP])
    assert validate(run, CPU).to_dict()["metric_for_best_model"] == "loss"
    assert "metric_for_best_model" not in validate(compose_run([]), CPU).to_dict()


def test_import_and_export_carry_the_best_checkpoint_keys() -> None:
    overrides = [
        "train.load_best_model_at_end=true",
        "train.metric_for_best_model=ppl",
        "train.max_steps=100",
        "train.eval_steps=10",
        "train.save_steps=20",
        "train.early_stopping_patience=0",
        "mode=export",
    ]
    run = compose_run(overrides)
    exported, _ = run_finetune_arguments(run, Path("/run"))
    assert exported["load_best_model_at_end"] is True
    assert exported["metric_for_best_model"] == "ppl"
    assert exported["greater_is_better"] is False  # PaddleNLP would take True for ppl
    # PaddleNLP's own parser accepts the keys as written.
    from paddlenlp.trl import SFTConfig

    parsed = SFTConfig(
        output_dir="/tmp/x",
        **{k: exported[k] for k in ("load_best_model_at_end", "metric_for_best_model")},
        **{k: exported[k] for k in ("greater_is_better", "evaluation_strategy", "eval_steps")},
        save_strategy="steps",
        save_steps=exported["save_steps"],
    )
    assert (parsed.metric_for_best_model, parsed.greater_is_better) == ("ppl", False)
    imported = import_arguments(exported, CONF_DIR, script_defaults())
    assert not {"load_best_model_at_end", "metric_for_best_model"} & set(imported.unsupported)
    back = {k: imported.settings[f"train.{k}"] for k in BEST_KEYS}
    assert back == {k: setting(run, f"train.{k}") or exported[k] for k in BEST_KEYS}
    assert back["greater_is_better"] is False and back["metric_for_best_model"] == "ppl"
    # A metric ftlab does not compute is listed, with why, and carries no half.
    other = import_arguments({**exported, "metric_for_best_model": "accuracy"}, CONF_DIR)
    assert "they compute loss, ppl" in other.unsupported["metric_for_best_model"]
    assert "train.load_best_model_at_end" not in other.settings
    assert "load_best_model_at_end" in other.unsupported


def test_the_export_says_run_finetune_has_no_early_stopping() -> None:
    run = compose_run(["train.early_stopping_patience=2", "mode=export"])
    _, notes = run_finetune_arguments(run, Path("/run"))
    assert any("EarlyStoppingCallback" in n for n in notes)


def weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(path.glob("peft_model-*.safetensors")):
        out.update(load_file(str(f)))
    assert out, path
    return out


def test_final_is_the_best_checkpoint_and_the_limit_keeps_it(tmp_path: Path, capsys) -> None:
    """4 steps, eval and save at each, limit 1: the best (step 2) and the newest (step 4)
    are kept; final/ holds step 2's weights bit for bit, not step 4's."""
    run_ftlab_forked(
        tmp_path,
        *RISING,
        *EVERY_STEP,
        "train.max_steps=4",
        "train.save_total_limit=1",
        "train.load_best_model_at_end=true",
    )
    (run_dir,) = (tmp_path / "outputs").glob("*/*_stories260k_lora")
    evals: dict[int, float] = {}  # the evaluations during training (the final one: last)
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if r.get("kind") == "eval" and "eval_loss" in r:
            evals.setdefault(r["step"], r["eval_loss"])
    best_step = min((s for s in evals if s <= 4), key=lambda s: evals[s])
    assert best_step < 4 and evals[4] > evals[best_step]  # the schedule made it rise
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == sorted({f"checkpoint-{best_step}", "checkpoint-4"})
    final = weights(run_dir / "final")
    best = weights(run_dir / f"checkpoints/checkpoint-{best_step}")
    last = weights(run_dir / "checkpoints/checkpoint-4")
    assert final.keys() == best.keys()
    assert all(np.array_equal(final[k], best[k]) for k in final)
    assert not all(np.array_equal(final[k], last[k]) for k in final)
    summary = json.loads((run_dir / "summary.json").read_text())
    b = summary["best_checkpoint"]
    assert (b["step"], b["metric"], b["loaded_into_final"]) == (best_step, "loss", True)
    assert b["value"] == pytest.approx(evals[best_step], rel=1e-6)
    assert summary["eval_loss"] == pytest.approx(evals[best_step], rel=1e-6)  # final eval
    assert summary["stopped_early_at"] is None
    runs_main([str(tmp_path / "outputs")])
    assert f"step {best_step} loss {evals[best_step]:.4f}" in capsys.readouterr().out


def test_early_stopping_stops_at_the_first_evaluation_that_does_not_improve(
    tmp_path: Path, capsys
) -> None:
    """Patience 1 on the same schedule: step 2 is the best, step 3 is worse, so the run
    ends at step 3 of 6, completed, with stopped_early_at: 3."""
    proc = run_ftlab_forked(
        tmp_path,
        *RISING,
        *EVERY_STEP,
        "train.max_steps=6",
        "train.load_best_model_at_end=true",
        "train.early_stopping_patience=1",
    )
    (run_dir,) = (tmp_path / "outputs").glob("*/*_stories260k_lora")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["stopped_early_at"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stopped_early_at"] == 3
    assert summary["best_checkpoint"]["step"] == 2
    assert "stopped early  at step 3" in proc.stdout + proc.stderr
    runs_main([str(tmp_path / "outputs")])
    assert "(stopped at 3)" in capsys.readouterr().out


def test_ranking_checkpoints_without_a_dev_split_is_refused_before_the_model(tmp_path) -> None:
    from ftlab.training.arguments import training_arguments

    run = compose_run(["train.load_best_model_at_end=true", *EVERY_STEP])
    with pytest.raises(ConfigError, match="needs evaluations, but the run has no dev split"):
        training_arguments(run, tmp_path, 4, has_eval=False)
