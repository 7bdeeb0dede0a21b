"""Where features meet (issue 31): settings of one group with another group's defaults.

Each case runs the real ``ftlab`` on the shipped model with two steps and tiny eval
settings, and ends ``completed`` or in one ``ftlab: error:`` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_ftlab_forked

from ftlab.assets import asset_path

TINY = ("train.max_steps=2", "eval.max_new_tokens=4", "data.max_length=128")


def tiny_text(tmp_path: Path) -> Path:
    """Six train and two dev documents of the shipped demo text (format detected)."""
    shipped = asset_path("demo_text")
    out = tmp_path / "text"
    out.mkdir()
    for name, n in (("train.json", 6), ("dev.json", 2)):
        lines = (shipped / name).read_text().splitlines()[:n]
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("ftlab: error: "), stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "extra",
    [
        ("data.format=text",),
        (
            "data.format=auto",
            "data.packing=greedy",
            "model.flash_attention=true",
            "model.flash_mask=true",
        ),
    ],
    ids=["text", "detected-greedy-flashmask"],
)
def test_text_data_with_the_default_run_turns_generation_off_in_one_line(tmp_path, extra):
    """The default data group asks for generation metrics; detected text data has no
    prompt/answer turns: one console line, ``derived.eval_generation=false``, completed."""
    data = tiny_text(tmp_path)
    proc = run_ftlab_forked(tmp_path, f"data.path={data}", *TINY, *extra, "hydra.run.dir=run")
    line = "generation metrics off: data.format=text has no prompt/answer turns"
    assert proc.stdout.count(line) == 1, proc.stdout
    resolved = yaml.safe_load((tmp_path / "run" / "resolved_config.yaml").read_text())
    assert resolved["derived"]["eval_generation"] is False
    assert resolved["derived"]["data_format"] == "text"
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "completed"


@pytest.mark.parametrize("fmt", ["text", "auto"])  # refused by validation / once detected
def test_text_data_with_generation_asked_for_is_refused_in_one_line(tmp_path, fmt):
    data = tiny_text(tmp_path)
    settings = (f"data.path={data}", f"data.format={fmt}", "eval.generation=true")
    proc = run_ftlab_forked(tmp_path, *settings, *TINY, check=False)
    assert proc.returncode == 2
    assert "eval.generation=true with data.format=text" in one_error_line(proc.stderr)
