"""The console scripts end without interpreter teardown, and lose nothing by it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

SCRIPT = """
import atexit, sys
{imports}
from ftlab.cli.process_exit import console_script
atexit.register(lambda: sys.stdout.write("atexit handler ran\\n"))
sys.stdout.write("buffered, not flushed\\n")
console_script(lambda: {code})()
sys.stdout.write("never reached\\n")
"""


@pytest.mark.parametrize(
    ("imports", "code", "status"),
    [("import paddle", "3", 3), ("import paddle", "None", 0), ("", "5", 5)],
    ids=["paddle-loaded", "none-is-0", "no-paddle"],
)
def test_console_script_keeps_exit_status_atexit_handlers_and_buffered_output(
    imports: str, code: str, status: int
) -> None:
    script = SCRIPT.format(imports=imports, code=code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == status, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines == ["buffered, not flushed", "atexit handler ran"]


def test_ftlab_commands_use_the_console_script_form() -> None:
    """pyproject's scripts that load Paddle end through process_exit; ``main`` itself
    still returns (tests and bench/startup.py call it in-process)."""
    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())[
        "project"
    ]["scripts"]
    for name in ("ftlab", "ftlab-predict", "ftlab-merge"):
        assert scripts[name].endswith(":console_main"), name


def test_a_profiled_run_keeps_the_normal_exit_and_its_profile(tmp_path: Path) -> None:
    """``python -m cProfile`` writes its profile after the script returns."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.format(imports="import paddle", code="0"))
    out = tmp_path / "profile.out"
    done = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(out), str(script)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.is_file() and out.stat().st_size > 0
