"""Disk: the plan's ``disk`` line against the bytes a CPU run writes, PaddleNLP's
unified-checkpoint options (validated, and their effect on the line), and the warning
when ``launch.disk_gib`` would be exceeded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CPU, compose_run
from helpers import run_ftlab_forked

from ftlab.config.environment import target_environment
from ftlab.errors import ConfigError
from ftlab.planning.disk import estimate_disk
from ftlab.record.rundir import dir_bytes
from ftlab.resolve.validate import validate
from ftlab.training.arguments import shared_arguments

THREE_SAVES = ("train.max_steps=3", "train.save_steps=1", "train.logging_steps=1")


def measured_against_plan(tmp_path: Path, *overrides: str) -> tuple[int, dict]:
    """(bytes of checkpoints/ + final/ after a CPU run, the plan's disk record)."""
    quiet = ("eval.demo_metric=false", "eval.generation=false")
    run_ftlab_forked(tmp_path, *overrides, *quiet)
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if (p / "final").is_dir()]
    # The newest save_total_limit (2) of 3 checkpoints are kept.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    written = dir_bytes(run_dir / "checkpoints") + dir_bytes(run_dir / "final")
    run_ftlab_forked(tmp_path, "mode=plan", *overrides, *quiet)
    (plan_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if (p / "plan.json").is_file()]
    return written, json.loads((plan_dir / "plan.json").read_text())["disk"]


def test_the_disk_line_is_what_a_lora_run_writes(tmp_path: Path) -> None:
    written, disk = measured_against_plan(tmp_path, *THREE_SAVES)
    assert disk["kept"] == 2 and disk["saves"] == 3
    assert disk["total"] == pytest.approx(written, rel=0.10)  # measured: within 1%


@pytest.mark.slow
def test_the_disk_line_is_what_a_full_fine_tuning_run_writes(tmp_path: Path) -> None:
    written, disk = measured_against_plan(tmp_path, "method=full", *THREE_SAVES)
    assert disk["total"] == pytest.approx(written, rel=0.10)  # measured: within 1%


def test_the_best_checkpoint_is_counted_beside_the_newest() -> None:
    run = compose_run(["train.eval_steps=1", "train.save_steps=1", "train.save_total_limit=2"])
    assert estimate_disk(run, 1, 10).kept == 2
    best = compose_run([*THREE_SAVES[1:], "train.eval_steps=1", "train.metric_for_best_model=loss"])
    assert estimate_disk(best, 1, 10).kept == 3  # 2 newest + the best
    assert estimate_disk(compose_run(["train.save_total_limit=-1"]), 1, 40).kept == 1


def gpu(*overrides: str):
    run = compose_run([*overrides, "device=gpu", "mode=plan"])
    return run, target_environment(run)


def test_unified_checkpoint_options_shrink_the_line_on_several_ranks() -> None:
    base = ("parallel=dp2", "precision=bf16", "method=full")
    plain = estimate_disk(compose_run(list(base)), 2, 10)
    assert plain.master_weights > 0  # AMP O2 keeps fp32 masters of the 16-bit weights
    options = "train.unified_checkpoint_config=[remove_master_weight,skip_save_model_weight]"
    run, env = gpu(*base, options, "train.ckpt_quant_stage=O1")
    validate(run, env)
    lean = estimate_disk(run, 2, 10)
    assert lean.master_weights == 0 and lean.weights == 0
    assert lean.optimizer == pytest.approx(plain.optimizer / 4, rel=1e-6)  # int8 vs fp32
    args = shared_arguments(run)
    assert args["unified_checkpoint_config"] == "remove_master_weight skip_save_model_weight"
    from paddlenlp.trl import SFTConfig

    parsed = SFTConfig(
        output_dir="/tmp/x",
        unified_checkpoint=True,
        unified_checkpoint_config=args["unified_checkpoint_config"],
        ckpt_quant_stage=args["ckpt_quant_stage"],
    )
    assert parsed.unified_checkpoint_config == ["remove_master_weight", "skip_save_model_weight"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ("train.unified_checkpoint_config=[async_save]",),
            "PaddleNLP 3.0.0b4 saves a one-process checkpoint whole",
        ),
        (
            ("parallel=dp2", "train.unified_checkpoint_config=[fast]"),
            "train.unified_checkpoint_config: unknown option 'fast'",
        ),
        (("parallel=dp2", "train.ckpt_quant_stage=O3"), "train.ckpt_quant_stage=O3: choose O0"),
        (
            ("parallel=dp2", "method=vera", "train.ckpt_quant_stage=O1"),
            "method=vera saves its own checkpoint",
        ),
    ],
)
def test_checkpoint_options_that_cannot_act_are_refused(
    overrides: tuple[str, ...], expected: str
) -> None:
    run = compose_run(list(overrides))
    with pytest.raises(ConfigError) as err:
        validate(run, CPU)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_plan_and_auto_warn_when_the_disk_would_be_exceeded(tmp_path: Path) -> None:
    proc = run_ftlab_forked(tmp_path, "mode=plan", "launch.disk_gib=0.0001")
    out = proc.stdout + proc.stderr
    assert "disk: checkpoints (1 x" in out and "launch.disk_gib" in out
    proc = run_ftlab_forked(tmp_path, "mode=export", "parallel=auto", "launch.disk_gib=0.0001")
    assert "more than the 104.86 KiB launch.disk_gib" in proc.stdout + proc.stderr
    proc = run_ftlab_forked(tmp_path, "mode=plan")  # a probed budget that holds: no warning
    assert "budget" in proc.stdout and "warning: disk" not in proc.stdout + proc.stderr
