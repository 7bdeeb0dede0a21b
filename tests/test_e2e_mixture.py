"""End to end: ``ftlab data=mixture`` with per-source accounting and the generation metric;
and (slow) the real ``ftlab`` command per optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import REPO, read_jsonl, run_ftlab

from ftlab.config.trainer_options import OPTIMIZERS


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    run_dir = tmp_path_factory.mktemp("mix") / "run"
    proc = run_ftlab(
        REPO,  # data=mixture names tests/fixtures/alpaca_seed relative to the repository
        "data=mixture",
        "train.max_steps=4",
        "train.logging_steps=1",
        "eval.max_new_tokens=4",
        "eval.demo_metric=false",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir, proc


@pytest.mark.slow  # one more ftlab process (~30 s idle, 126 s on the loaded CI machine)
def test_mixture_run_accounts_per_source(mixture_run) -> None:
    run_dir, _ = mixture_run
    summary = json.loads((run_dir / "summary.json").read_text())
    stories, alpaca = summary["data"]["sources"]
    total = stories["drawn"] + alpaca["drawn"]
    assert total == summary["derived"]["train_examples"] == 2000 + 48
    assert stories["share"] == pytest.approx(0.75, abs=1 / total)
    assert (stories["format"], alpaca["format"]) == ("src_tgt", "alpaca")
    for src in (stories, alpaca):
        assert src["eval_loss"] > 0 and len(src["fingerprint"]) == 64
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert any("eval_stories_loss" in r for r in metrics)
    assert any("eval_alpaca_loss" in r for r in metrics)
    rows = read_jsonl(run_dir / "predictions.jsonl")
    assert {r["source"] for r in rows} == {"stories", "alpaca"}
    assert summary["generation"]["records"] == len(rows)
    fingerprints = json.loads((run_dir / "data_fingerprints.json").read_text())
    assert any("alpaca_seed/train.json" in k for k in fingerprints)
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert "mixture_weights:" in resolved and "stories: 0.75" in resolved


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_ftlab_trains_with_every_optimizer(optim: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_ftlab(
        tmp_path,
        "method=full",
        f"train.optim={optim}",
        "train.max_steps=6",
        "train.logging_steps=1",
        "train.learning_rate=3e-3",
        "eval.demo_metric=false",
        "eval.generation=false",
        f"hydra.run.dir={run_dir}",
    )
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 6 and all(x == x and abs(x) < 1e3 for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    resolved = (run_dir / "resolved_config.yaml").read_text()
    assert f"optim: {optim}" in resolved
