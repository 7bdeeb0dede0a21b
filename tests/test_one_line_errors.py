"""The red team's tracebacks and silent acceptances (issue 31), each now one clear line.

Everything here runs in-process on configs, small files and fake run dirs (no training).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPU, compose_run
from fake_runs import make_run, metrics

from ftlab.assets import asset_path
from ftlab.cli import importer, predict, runs
from ftlab.config.schema import DataConfig
from ftlab.data.records import BadRecords, iter_records
from ftlab.data.stats import SplitStats
from ftlab.errors import ConfigError, DataError
from ftlab.resolve.validate import validate


def one_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def model_dir(tmp_path: Path, **changes) -> Path:
    out = tmp_path / "model"
    shutil.copytree(asset_path("stories260k"), out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))
    return out


@pytest.mark.parametrize(
    "change",
    [{"num_attention_heads": 0}, {"num_hidden_layers": -1}, {"num_hidden_layers": "5"}],
    ids=["heads-0", "layers-negative", "layers-string"],
)
def test_a_config_json_size_that_cannot_work_is_named(tmp_path, change):
    ((key, value),) = change.items()
    path = model_dir(tmp_path, **change)
    with pytest.raises(ConfigError, match=rf"model\.arch\.{key}={value!r}: must be a whole number"):
        compose_run([f"model.name_or_path={path}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.rope_scaling.factor=nan", r"factor=nan must be a number from 1 to 256"),
        ("model.rope_scaling.factor=inf", r"factor=inf must be a number from 1 to 256"),
        ("model.rope_scaling.factor=1e9", r"factor=1000000000.0 must be a number from 1 to"),
        ("method.lora_dropout=1.5", r"method\.lora_dropout=1\.5: a probability in \[0, 1\)"),
        ("method.lora_dropout=-0.5", r"method\.lora_dropout=-0\.5: a probability"),
        ("launch.rendezvous_timeout=1e12", r"rendezvous_timeout=1000000000000.0: at most 604800"),
        ("parallel=dp2", r"stage=kto with parallel=dp2: PaddleNLP 3.0.0b4's KTO criterion"),
    ],
)
def test_a_setting_out_of_range_is_refused_before_any_load(override, message):
    extra = ["model.rope_scaling.strategy=linear"] if "rope" in override else []
    extra += ["stage=kto"] if override == "parallel=dp2" else []  # found by the matrix
    with pytest.raises(ConfigError, match=message):
        validate(compose_run([override, *extra]), CPU)


def test_a_json_line_nested_too_deeply_names_its_file_and_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"src": "a", "tgt": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    stats = SplitStats()
    with pytest.raises(DataError, match=r"train\.json:2: nested too deeply"):
        list(iter_records(path, BadRecords("error", stats), stats))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"learning_rate": "abc"}, 'learning_rate="abc": run_finetune.py expects a number'),
        ({"lora_rank": None}, "lora_rank=null: run_finetune.py expects a whole number"),
        (None, "a directory; give the argument file"),
    ],
    ids=["string-number", "null-int", "directory"],
)
def test_import_of_a_malformed_argument_file_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "args"
    if content is None:
        path.mkdir()
    else:
        path.write_text(json.dumps({"model_name_or_path": "x", **content}))
    with pytest.raises(SystemExit) as exit_:
        importer.main([str(path)])
    assert exit_.value.code == 2
    assert message in one_error(capsys, "ftlab-import")


@pytest.fixture
def two_runs(tmp_path) -> list[str]:
    return [
        str(
            make_run(tmp_path / name, ["method=lora"], "2026-12-01T10:00:00", metrics=metrics(1, 1))
        )
        for name in ("a", "b")
    ]


@pytest.mark.parametrize("plot", ["x.json", "plots", "noext"])
def test_compare_refuses_a_plot_path_matplotlib_would_not_write_as_named(
    tmp_path, capsys, two_runs, plot
):
    target = tmp_path / plot
    if plot == "plots":
        target.mkdir()
    with pytest.raises(SystemExit) as exit_:
        runs.main(["--compare", *two_runs, "--plot", str(target)])
    assert exit_.value.code == 2
    assert f"--plot {target}" in one_error(capsys, "ftlab-runs")
    assert not list(tmp_path.glob("*.png"))


def test_runs_limit_below_one_is_refused(tmp_path, capsys, two_runs):
    with pytest.raises(SystemExit) as exit_:
        runs.main([str(tmp_path), "-n", "-3"])
    assert exit_.value.code == 2
    assert "-n -3: give a number of runs >= 1" in one_error(capsys, "ftlab-runs")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be >= 1"),
        (["--temperature", "-1"], "--temperature -1.0: must be > 0"),
        (["--top-p", "2"], "--top-p 2.0: must be in (0, 1]"),
    ],
)
def test_predict_generation_options_out_of_range(tmp_path, capsys, two_runs, option, message):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"src": "x"}\n')
    args = [two_runs[0], "--input", str(prompts), "--output", str(tmp_path / "o.jsonl"), *option]
    assert predict.main(args) == 2
    assert message in one_error(capsys, "ftlab-predict")


def test_the_rendezvous_watchdog_survives_a_huge_timeout_and_still_fires():
    """A timeout beyond Python's limit once killed the watchdog thread silently (the job
    then waited forever); validation refuses it now, and the watchdog waits in slices."""
    code = (
        "import threading, time, sys\n"
        "from ftlab.distributed import paddle_launch as pl\n"
        "pl.bound_rendezvous(1e12, None, '2')\n"
        "time.sleep(0.5)\n"
        "alive = [t for t in threading.enumerate() if t.name == 'ftlab-rendezvous-watchdog']\n"
        "print('alive' if alive and alive[0].is_alive() else 'dead', flush=True)\n"
        "pl.bound_rendezvous(0.2, None, '2')\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    from ftlab.distributed.paddle_launch import RENDEZVOUS_EXIT, RENDEZVOUS_MARKER

    assert proc.stdout.splitlines()[0] == "alive", proc.stdout + proc.stderr[-2000:]
    assert proc.returncode == RENDEZVOUS_EXIT
    assert RENDEZVOUS_MARKER in proc.stdout


def test_preference_records_under_sft_say_which_stage_reads_them(tok):
    from ftlab.data.build import build_data

    cfg = DataConfig(name="p", path=str(asset_path("demo_preferences")), format="src_tgt")
    with pytest.raises(DataError, match=r"train\.json:1: .* preference data, .*stage=dpo"):
        build_data(cfg, tok, seed=0, need_dev=False)


def test_a_streamed_run_does_not_claim_zero_train_examples():
    from ftlab.data.stats import DataStats
    from ftlab.training.run import data_line

    stats = DataStats("src_tgt", None, "none", 128, streaming=True, dev_source=None)
    assert data_line(stats).startswith("data   train streamed (read lazily")
    assert "0 examples" not in data_line(stats)


def test_console_warnings_carry_one_prefix():
    import logging

    from ftlab.cli.console import ConsoleFormatter

    record = logging.LogRecord(
        "ftlab.console", logging.WARNING, "", 0, "%s", ("x is damaged",), None
    )
    assert ConsoleFormatter().format(record) == "warning: x is damaged"
    source = (Path(__file__).parents[1] / "ftlab" / "training" / "run.py").read_text()
    assert 'console.warning("warning:' not in source  # the formatter adds the prefix


def test_a_tensor_parallel_rank_reports_the_whole_models_parameters(monkeypatch):
    """tp2 (cpu_emulation) reported one rank's count (130,368 instead of 260,032)."""
    from types import SimpleNamespace

    from ftlab.models import loading
    from ftlab.models.loading import parameter_counts

    split = SimpleNamespace(size=1000, stop_gradient=False, is_distributed=True)
    norm = SimpleNamespace(size=64, stop_gradient=True, is_distributed=False)
    model = SimpleNamespace(parameters=lambda: [split, norm], sublayers=lambda: [])
    assert parameter_counts(model) == {"total": 1064, "trainable": 1000}
    monkeypatch.setattr(loading, "model_parallel_kwargs", lambda: {"tensor_parallel_degree": 2})
    assert parameter_counts(model) == {"total": 2064, "trainable": 2000}
