"""The GPU plan held against published GPU memory measurements.

``tests/fixtures/published_memory/rows.yaml`` lists figures other projects published for
fine-tuning runs, with the settings they ran (PROVENANCE.md). Each row ftlab can express is
planned with its overrides and the ratio plan / published must stay in the row's band, so
a later change to the plan cannot drift from what people observed without a test saying
so. ``bench/plan_vs_published.py`` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import compose_run

from ftlab.config.environment import Environment
from ftlab.planning.plan import make_plan
from ftlab.resolve.validate import validate

ROWS = Path(__file__).parent / "fixtures" / "published_memory" / "rows.yaml"
GIB = 2**30
KINDS = {"nvidia-smi", "reserved", "allocated", "unstated"}


def load_table() -> dict[str, Any]:
    return yaml.safe_load(ROWS.read_text())


def row_overrides(table: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The row's overrides with ``@qwen1_arch.<size>`` expanded to its dimensions."""
    out: list[str] = []
    for o in row["overrides"]:
        if o.startswith("@"):
            group, key = o[1:].split(".", 1)
            out += table[group][key]
        else:
            out.append(o)
    return out + ["device=gpu"]


def gpu_env(devices: int) -> Environment:
    return Environment(
        device="gpu", device_count=devices, paddle_version="3.3.1", gpu_compute_capability=(8, 0)
    )


@dataclass
class Compared:
    row: dict[str, Any]
    plan_gib: float  # the plan's figure of the published kind, per device
    published_gib: float  # per device
    eval_gib: float  # the plan's evaluation-pass peak (reported, not compared)

    @property
    def ratio(self) -> float:
        return self.plan_gib / self.published_gib


def compare(table: dict[str, Any], row: dict[str, Any]) -> Compared:
    """Plan the row and put the plan's figure of the published kind beside it."""
    run = compose_run(row_overrides(table, row))
    devices = row.get("devices", run.parallel.nproc_per_node or 1)
    env = gpu_env(max(devices, 8))
    mem = make_plan(run, validate(run, env), "gpu")["memory_bytes"]
    if row["kind"] == "allocated":
        plan = mem["in_use"]
    elif row["kind"] == "reserved":
        plan = mem["training_reserved"] - mem["gpu_runtime"]
    else:  # nvidia-smi, or unstated: what a user reads on the device
        plan = mem["training_reserved"]
    published = row["figure_gib"] / (row.get("devices", 1) if row["per"] == "total" else 1)
    return Compared(row, plan / GIB, published, mem["needed"] / GIB)


def compared_rows() -> list[dict[str, Any]]:
    return [r for r in load_table()["rows"] if r.get("expressible", True)]


def test_the_table_is_whole() -> None:
    """Every row says where it comes from and what it measured; a row ftlab cannot express
    says why; at least 10 compared rows from 3 sources."""
    table = load_table()
    rows = table["rows"]
    for row in rows:
        assert row["source"] in table["sources"], row["id"]
        assert row["quote"] and row["figure_gib"] > 0 and row["kind"] in KINDS, row["id"]
        assert row["per"] in ("device", "total"), row["id"]
        if row.get("expressible", True):
            assert row["overrides"] and row["phase"] == "train", row["id"]
            low, high = row["band"]
            assert 0 < low < 1 < high, row["id"]
        else:
            assert len(row["reason"]) > 40, row["id"]
    compared = compared_rows()
    assert len(compared) >= 10
    assert len({r["source"] for r in compared}) >= 3
    assert len({r["id"] for r in rows}) == len(rows)


@pytest.mark.parametrize("row", compared_rows(), ids=lambda r: r["id"])
def test_plan_matches_published_figure(row: dict[str, Any]) -> None:
    c = compare(load_table(), row)
    low, high = row["band"]
    assert low <= c.ratio <= high, (
        f"{row['id']}: plan {c.plan_gib:.1f} GiB / published {c.published_gib:.1f} GiB "
        f"= {c.ratio:.2f}, outside [{low}, {high}]"
    )


def test_the_evaluation_batch_is_planned_and_named_when_it_does_not_fit() -> None:
    """PaddleNLP's SFT recipe for Qwen2.5-0.5B evaluates 8 rows of 2048 tokens: their fp32
    logits (151,936 columns) need more than the training step, and parallel=auto names the
    evaluation batch that would fit on a 24 GiB card."""
    from ftlab.errors import ConfigError
    from ftlab.planning.advice import no_fit_error
    from ftlab.planning.auto import decide

    table = load_table()
    sft = next(r for r in table["rows"] if r["id"] == "paddlenlp-qwen2.5-0.5b-sft")
    run = compose_run(row_overrides(table, sft))
    mem = make_plan(run, validate(run, gpu_env(8)), "gpu")["memory_bytes"]
    logits = 8 * 2048 * 151_936 * (2 + 2 * 4)  # 16-bit logits + fp32 cast + fp32 softmax
    resident = mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert mem["evaluation"] == pytest.approx(resident + logits, rel=0.01)  # + eval masks
    assert mem["evaluation"] > 2 * mem["in_use"]
    assert mem["needed"] > mem["training_reserved"]
    overrides = [o for o in row_overrides(table, sft) if not o.startswith("train.recompute")]
    auto = compose_run(
        ["parallel=auto", "launch.device_memory_gib=24", "parallel.nproc_per_node=1", *overrides]
    )
    env = gpu_env(1)
    decision = decide(auto, env)
    assert decision.chosen is None
    err = no_fit_error(auto, env, decision)
    assert isinstance(err, ConfigError)
    assert "smaller evaluation batch: train.per_device_eval_batch_size=" in str(err)
