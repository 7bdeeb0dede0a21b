"""``ftlab-runs --compare``: settings that differ, final metrics side by side, loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_runs import make_run, metrics

from ftlab.cli.runs import main
from ftlab.record.compare import compare_runs

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast


def with_curves(run_dir: Path, train: list[float], evals: list[tuple[int, float]]) -> Path:
    lines = [
        {"step": 2 * (i + 1), "kind": "train", "loss": loss, "learning_rate": 0.01}
        for i, loss in enumerate(train)
    ]
    lines += [{"step": s, "kind": "eval", "eval_loss": v, "eval_ppl": 2.0} for s, v in evals]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    a = make_run(
        tmp_path / "outputs/2026-01-02/10-00-00_stories260k_lora",
        ["train.max_steps=6"],
        "2026-01-02T10:00:00+00:00",
        metrics=metrics(1.5437, 1.3588, 0.5),
    )
    b = make_run(
        tmp_path / "outputs/2026-01-02/11-00-00_stories260k_full",
        ["train.max_steps=6", "method=full", "train.learning_rate=3e-3"],
        "2026-01-02T11:00:00+00:00",
        metrics={**metrics(1.2, 1.1, 0.75), "method": "full"},
    )
    with_curves(a, [1.9, 1.7, 1.5437], [(6, 1.3588)])
    with_curves(b, [1.8, 1.4, 1.2], [(6, 1.1)])
    return [a, b]


def test_compare_prints_differences_metrics_and_writes_the_plot(runs, tmp_path, capsys) -> None:
    png = tmp_path / "cmp.png"
    main(["--compare", *map(str, runs), "--plot", str(png)])
    out = capsys.readouterr().out
    assert out.startswith("comparing 2 runs\n  A  ") and f"  B  {runs[1]}" in out
    section = out.split("settings that differ")[1].split("final metrics")[0]
    rows = {line.split()[0]: line.split()[1:] for line in section.strip().splitlines()[1:]}
    assert rows["method.name"] == ["lora", "full"]
    assert rows["train.learning_rate"] == ["0.01", "0.003"]
    assert rows["method.lora_rank"] == ["8", "-"]  # full fine-tuning has no rank
    assert "train.max_steps" not in rows and "model.name" not in rows  # the same in both
    metrics_rows = out.split("final metrics")[1]
    assert "eval loss" in metrics_rows and "1.3588" in metrics_rows and "1.1000" in metrics_rows
    assert "entity recall, tuned" in metrics_rows and "0.500" in metrics_rows
    assert f"loss curves: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_compare_reads_the_curves(runs) -> None:
    compared, _ = compare_runs(runs, None)
    assert compared[0].curves["train"] == [(2, 1.9), (4, 1.7), (6, 1.5437)]
    assert compared[1].curves["eval"] == [(6, 1.1)]
    assert [r.label for r in compared] == [p.name for p in runs]


def test_compare_refuses_one_run_and_non_runs(runs, tmp_path, capsys) -> None:
    for argv in (["--compare", str(runs[0])], ["--compare", str(runs[0]), str(tmp_path)]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "needs at least two run dirs" in err and "is not a run dir" in err
