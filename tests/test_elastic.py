"""Resume on a different layout (elastic): what PaddleNLP's unified checkpoint reshards
continues with the losses of a run never interrupted; the rest is refused by name.

The default suite checks the decisions on recorded configs (no training); the slow tests
train for real: a run on one layout is killed after a checkpoint and resumed on another,
and the per-step losses after the resume must equal the uninterrupted single-process run
with the same global batch, which ``tests/test_distributed.py`` shows equal to dp2 and
sharding stage 1 (1e-5). Zeroing the optimizer moments in the checkpoint moves the loss of
the second step after the resume by 0.06, so these comparisons would catch a reshard that
lost the optimizer state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CPU, GPU8, compose_run, without_paddle_vars

from ftlab.config.environment import Environment
from ftlab.errors import ConfigError

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

TOLERANCE = 1e-5


def recorded_run(tmp_path: Path, overrides: list[str], env: Environment = CPU) -> Path:
    """A run dir holding only the resolved config a run with ``overrides`` records."""
    from ftlab.resolve.compose import resolved_config_yaml
    from ftlab.resolve.validate import validate

    run = compose_run(overrides)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resolved_config.yaml").write_text(resolved_config_yaml(run, validate(run, env)))
    return run_dir


def resumed_as(overrides: list[str], env: Environment = CPU) -> dict[str, Any]:
    """The resumed run's settings with its derived values, as ``training.run`` passes them."""
    from ftlab.resolve.compose import to_plain_dict
    from ftlab.resolve.validate import validate

    run = compose_run(overrides)
    return {**to_plain_dict(run), "derived": validate(run, env).to_dict()}


# (recorded layout, resumed layout): each keeps the global batch of 8.
B4, B8 = "train.per_device_train_batch_size=4", "train.per_device_train_batch_size=8"
RESHARDABLE = [
    (["parallel=dp2", B4], ["parallel=single", B8]),
    (["parallel=single", B8], ["parallel=dp2", B4]),
    (["parallel=sharding_stage1", B4], ["parallel=dp2", B4]),
    (["parallel=dp2", B4], ["parallel=sharding_stage1", B4]),
]


@pytest.mark.parametrize(("before", "after"), RESHARDABLE)
def test_a_layout_the_checkpoint_reshards_to_is_accepted_and_recorded(
    before: list[str], after: list[str], tmp_path: Path, caplog: Any
) -> None:
    from ftlab.record.resume import check_resume_config

    run_dir = recorded_run(tmp_path, before)
    changes = check_resume_config(run_dir, resumed_as(after))
    layout = [c for c in changes if c.startswith("layout: ")]
    old, new = before[0].split("=")[1], after[0].split("=")[1]
    assert (
        len(layout) == 1
        and layout[0].startswith(f"layout: {old} (")
        and f"-> {new} (" in (layout[0])
    ), changes
    assert "resume on a different layout: parallel=" in caplog.text


def test_nodes_and_processes_per_node_may_change_without_a_reshard(tmp_path: Path) -> None:
    """Two nodes of one process each, resumed as one node of two: the same ranks."""
    from ftlab.record.resume import check_resume_config

    two_nodes = ["parallel=dp2", "parallel.nproc_per_node=1", "launch.nnodes=2"]
    run_dir = recorded_run(tmp_path, [*two_nodes, "launch.master=127.0.0.1:8090"])
    changes = check_resume_config(run_dir, resumed_as(["parallel=dp2"]))
    assert not [c for c in changes if c.startswith("layout: ")], changes


@pytest.mark.parametrize(
    ("before", "after", "env", "match"),
    [
        (
            ["parallel=tp2", "parallel.cpu_emulation=true", "method=full"],
            ["parallel=single", "method=full"],
            CPU,
            r"parallel.tensor cannot change on resume \(2 -> 1\).*Keep parallel.tensor=2",
        ),
        (
            ["parallel=pp2", "parallel.cpu_emulation=true", "method=full"],
            ["parallel=single", "method=full"],
            CPU,
            r"parallel.pipeline cannot change on resume \(2 -> 1\)",
        ),
        (
            ["parallel=sharding_stage3", "parallel.sharding=8", "device=gpu", "precision=bf16"],
            ["parallel=sharding_stage1", "parallel.sharding=8", "device=gpu", "precision=bf16"],
            GPU8,
            r"ZeRO stage 3 splits the parameters themselves.*parallel=sharding_stage3",
        ),
        (
            ["parallel=dp2", "method=vera", "train.per_device_train_batch_size=4"],
            ["parallel=single", "method=vera", "train.per_device_train_batch_size=8"],
            CPU,
            r"method=vera cannot use PaddleNLP's unified checkpoint.*cannot be resharded",
        ),
        (  # the batch changes too (1 data rank): the layout is what cannot be resumed
            ["parallel=dp2", B4],
            ["parallel=tp2", "parallel.cpu_emulation=true", B4],
            CPU,
            r"parallel.tensor cannot change on resume \(1 -> 2\)",
        ),
    ],
    ids=["tensor", "pipeline", "zero3", "vera", "tensor-before-batch"],
)
def test_a_layout_that_cannot_be_resharded_is_refused_by_name(
    before: list[str], after: list[str], env: Environment, match: str, tmp_path: Path
) -> None:
    from ftlab.record.resume import check_resume_config

    run_dir = recorded_run(tmp_path, before, env)
    with pytest.raises(ConfigError, match=match):
        check_resume_config(run_dir, resumed_as(after, env))


def test_a_changed_global_batch_is_refused_with_the_batch_that_keeps_it(tmp_path: Path) -> None:
    from ftlab.record.resume import check_resume_config

    run_dir = recorded_run(tmp_path, ["parallel=dp2", "train.per_device_train_batch_size=4"])
    # The node is lost, the per-device batch kept: half the global batch.
    with pytest.raises(
        ConfigError,
        match=r"global batch would be 4 .*instead of the checkpoint's 8.*"
        r"train.per_device_train_batch_size=8\.",
    ):
        check_resume_config(
            run_dir, resumed_as(["parallel=single", "train.per_device_train_batch_size=4"])
        )
    # The same on an unchanged layout.
    with pytest.raises(
        ConfigError, match=r"global batch would be 16 .*per_device_train_batch_size=4\."
    ):
        check_resume_config(
            run_dir, resumed_as(["parallel=dp2", "train.per_device_train_batch_size=8"])
        )


# --------------------------------------------------------------------------- real runs

COMMON = [
    "train.max_steps=12",
    "train.save_steps=3",
    "train.logging_steps=1",
    "train.warmup_steps=0",
    "eval.demo_metric=false",
    "device=cpu",
]


def environment() -> dict[str, str]:
    return without_paddle_vars(os.environ)


def ftlab(cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftlab.cli.app", *overrides],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = ftlab(
        cwd, *COMMON, "parallel=single", "train.per_device_train_batch_size=8", "hydra.run.dir=run"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return losses(cwd / "run")


def killed_after_a_checkpoint(cwd: Path, layout: list[str]) -> Path:
    """Start a run on ``layout``; SIGKILL its ftlab process once checkpoint-3 exists (a lost
    node: Paddle's launcher and the workers die with it)."""
    run_dir = cwd / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftlab.cli.app", *COMMON, *layout, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    start = time.time()
    while not (run_dir / "checkpoints" / "checkpoint-3").is_dir():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - start < 300
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Paddle's launcher and the workers die with the killed ftlab (PR_SET_PDEATHSIG); the
    # resume waits for the process its status names (it refuses a run still running).
    from ftlab.record.status import is_running

    status = json.loads((run_dir / "status.json").read_text())
    while is_running(status):
        assert time.time() - start < 360, status
        time.sleep(0.1)
    assert not (run_dir / "summary.json").exists(), "the run finished before the kill"
    return run_dir


@pytest.mark.slow  # ~1 min each: a killed run and its resume, one of them with 2 processes
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("before", "after"), RESHARDABLE[:3], ids=["dp2-single", "single-dp2", "sharding1-dp2"]
)
def test_resume_on_another_layout_continues_with_the_uninterrupted_losses(
    before: list[str], after: list[str], uninterrupted: dict[int, float], tmp_path: Path
) -> None:
    run_dir = killed_after_a_checkpoint(tmp_path, before)
    proc = ftlab(tmp_path, f"resume={run_dir}", *after)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resume on a different layout: parallel=" in proc.stdout + proc.stderr
    resolved = (run_dir / "resolved_config.yaml").read_text()
    old, new = before[0].split("=")[1], after[0].split("=")[1]
    recorded = [line for line in resolved.splitlines() if "layout: " in line]
    assert len(recorded) == 1 and f"layout: {old} (" in recorded[0], resolved
    assert f"-> {new} (" in recorded[0], recorded
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed_from = int(summary["derived"]["resumed_from"].rsplit("-", 1)[1])
    assert resumed_from >= 3 and resumed_from < 12
    got = losses(run_dir)
    assert sorted(got) == sorted(uninterrupted) == list(range(1, 13))
    after_resume = [s for s in got if s > resumed_from]
    worst = max(abs(got[s] - uninterrupted[s]) for s in after_resume)
    assert worst <= TOLERANCE, (resumed_from, {s: (got[s], uninterrupted[s]) for s in after_resume})
