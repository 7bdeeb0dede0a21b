"""The step-time model held against published training throughputs.

``tests/fixtures/published_throughput/rows.yaml`` lists tokens per device per second that
projects published with their settings. With the calibrated profile
(``ftlab.planning.cost.PROFILES``) the estimate of each row must stay in the row's band;
``bench/plan_vs_published.py --throughput`` prints the MFU each row implies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import compose_run
from test_published_memory import gpu_env, load_table

from ftlab.planning.cost import PROFILES
from ftlab.planning.plan import layout_estimate

ROWS = Path(__file__).parent / "fixtures" / "published_throughput" / "rows.yaml"


def load_rows() -> list[dict[str, Any]]:
    return yaml.safe_load(ROWS.read_text())["rows"]


def estimate(row: dict[str, Any], mfu: float | None = None) -> dict[str, Any]:
    """The cost model's estimate of the row's layout (``launch.mfu`` when given)."""
    arch = load_table()["qwen1_arch"]
    overrides: list[str] = []
    for o in row["overrides"]:
        overrides += arch[o.split(".", 1)[1]] if o.startswith("@") else [o]
    overrides += ["device=gpu", f"launch.accelerator={row['gpu']}"]
    if mfu is not None:
        overrides.append(f"launch.mfu={mfu}")
    run = compose_run(overrides)
    env = gpu_env(run.parallel.nproc_per_node or 1)
    extra, _ = layout_estimate(run, env, None, [])
    return extra["estimate"]


def per_device_tokens(est: dict[str, Any]) -> float:
    return est["tokens_per_second"] / (est["nproc_per_node"] * est["nnodes"])


def implied_mfu(row: dict[str, Any]) -> float:
    """The MFU at which the model's step matches the published throughput: compute (and
    the bubble) scale with 1/MFU, communication does not."""
    est = estimate(row, mfu=1.0)
    step = est["step"]
    compute = step["compute"] + step["bubble"]
    comm = step["total"] - compute
    measured = step["total"] * per_device_tokens(est) / row["tokens_per_device_s"]
    return compute / (measured - comm)


def test_the_throughput_table_is_whole() -> None:
    rows = load_rows()
    assert len(rows) >= 5 and len({r["source"].split(" ")[0] for r in rows}) >= 2
    for row in rows:
        assert row["quote"] and row["tokens_per_device_s"] > 0 and row["gpu"] in PROFILES
        low, high = row["band"]
        assert 0 < low < 1 < high


@pytest.mark.parametrize("row", load_rows(), ids=lambda r: r["id"])
def test_calibrated_step_time_matches_published_throughput(row: dict[str, Any]) -> None:
    ratio = per_device_tokens(estimate(row)) / row["tokens_per_device_s"]
    low, high = row["band"]
    assert low <= ratio <= high, f"{row['id']}: estimate / published tokens/s = {ratio:.2f}"


@pytest.mark.parametrize("accelerator, calibrated", [("a100", True), ("h100", False)])
def test_an_uncalibrated_profile_says_so_in_the_plan(accelerator: str, calibrated: bool) -> None:
    from ftlab.planning.plan import step_time_assumptions

    run = compose_run(
        ["model=llama3", "method=lora", "precision=bf16", "device=gpu"]
        + [f"launch.accelerator={accelerator}", "parallel=tp4"]
    )
    extra, lines = layout_estimate(run, gpu_env(8), None, [])
    notes = step_time_assumptions({"assumptions": [], **extra})
    text = "\n".join(lines)
    assert extra["estimate"]["hardware"]["mfu"] == PROFILES[accelerator].mfu
    if calibrated:
        assert notes == [] and "(calibrated)" in text and "uncalibrated" not in text
    else:
        assert len(notes) == 1 and f"the {accelerator} profile is uncalibrated" in notes[0]
        assert "MFU 0.4 (uncalibrated)" in text
    # A launch.mfu setting is the user's calibration: nothing to warn about.
    run = compose_run(
        ["model=llama3", "method=lora", "precision=bf16", "device=gpu"]
        + [f"launch.accelerator={accelerator}", "launch.mfu=0.3", "parallel=tp4"]
    )
    extra, _ = layout_estimate(run, gpu_env(8), None, [])
    assert step_time_assumptions({"assumptions": [], **extra}) == []
