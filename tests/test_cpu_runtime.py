"""The CPU fast path: MKL's AVX2 kernels on AMD CPUs and Paddle's math threads per process
are decided before Paddle loads, recorded with the run, and change no loss beyond 1e-6."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CPU, GPU8, compose_run

from ftlab.config.cpu_runtime import (
    CPU_LAYERS,
    MKL_VAR,
    SET_BY_FTLAB_VAR,
    CpuInfo,
    choose_mkl_path,
    read_cpu_info,
    resolve_cpu_threads,
)
from ftlab.errors import ConfigError
from ftlab.resolve.validate import validate

FTLAB = Path(sys.executable).with_name("ftlab")
AMD_AVX2 = CpuInfo("AuthenticAMD", frozenset({"sse4_2", "avx", "avx2"}))


def test_amd_with_avx2_gets_mkl_avx2_kernels() -> None:
    environ: dict[str, str] = {}
    path = choose_mkl_path(True, environ, AMD_AVX2)
    assert environ[MKL_VAR] == "5" and path.value == "5"
    assert "AMD CPU with AVX2" in path.describe()
    # A worker inherits both variables and records ftlab as the one that chose.
    again = choose_mkl_path(True, dict(environ), AMD_AVX2)
    assert again.value == "5" and "set by ftlab" in again.reason


@pytest.mark.parametrize(
    ("enabled", "environ", "cpu", "value", "reason"),
    [
        (True, {MKL_VAR: "2"}, AMD_AVX2, "2", "set in the environment by the user"),
        (False, {}, AMD_AVX2, None, "launch.cpu_fast_path=false"),
        (True, {}, CpuInfo("GenuineIntel", frozenset({"avx2"})), None, "GenuineIntel CPU"),
        (True, {}, CpuInfo("AuthenticAMD", frozenset({"sse4_2"})), None, "without AVX2"),
    ],
)
def test_mkl_path_left_alone(enabled, environ, cpu, value, reason) -> None:
    before = dict(environ)
    path = choose_mkl_path(enabled, environ, cpu)
    assert environ == before  # nothing set
    assert path.value == value and reason in path.reason


def test_cpu_info_reads_vendor_and_flags(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 fma\n\n")
    assert read_cpu_info(info) == CpuInfo("AuthenticAMD", frozenset({"fpu", "avx2", "fma"}))
    assert read_cpu_info(tmp_path / "missing") == CpuInfo("", frozenset())


@pytest.mark.parametrize(
    ("setting", "per_node", "cores", "threads"),
    [("auto", 1, 2, 2), ("auto", 2, 2, 1), ("auto", 4, 2, 1), ("auto", 2, 16, 8), ("3", 1, 2, 3)],
)
def test_cpu_threads(setting, per_node, cores, threads) -> None:
    assert resolve_cpu_threads(setting, per_node, cores) == threads


@pytest.mark.parametrize("setting", ["0", "-1", "two", "1.5"])
def test_cpu_threads_refused(setting) -> None:
    with pytest.raises(ConfigError, match="launch.cpu_threads"):
        resolve_cpu_threads(setting, 1, 2)


def test_validation_derives_threads_per_process_on_cpu_only(monkeypatch) -> None:
    monkeypatch.setattr("ftlab.resolve.validate.available_cores", lambda: 2)
    assert validate(compose_run([]), CPU).cpu_threads == 2
    assert validate(compose_run(["parallel=dp2"]), CPU).cpu_threads == 1
    assert validate(compose_run(["device=gpu"]), GPU8).cpu_threads is None
    with pytest.raises(ConfigError, match="launch.cpu_threads='many'"):
        validate(compose_run(["launch.cpu_threads=many"]), CPU)


def _losses(cwd: Path, *overrides: str) -> tuple[list[float], dict]:
    # The parent's choice must not leak into the child: each run decides for itself.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PADDLE_") and k not in (MKL_VAR, SET_BY_FTLAB_VAR)
    }
    run_dir = cwd / "run"
    proc = subprocess.run(
        [
            str(FTLAB),
            "train.max_steps=3",
            "train.logging_steps=1",
            "eval.generation=false",
            "eval.demo_metric=false",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r] + [
        r["eval_loss"] for r in rows if "eval_loss" in r
    ]
    environment = json.loads((run_dir / "environment.json").read_text())
    return losses, environment


def test_fast_path_changes_no_loss(tmp_path: Path) -> None:
    """Default (MKL's AVX2 kernels where they apply, all cores, ftlab's CPU layouts of
    attention, RMSNorm and rotary) vs Paddle's own defaults (MKL's vendor choice, one thread,
    PaddleNLP's layers): the same training and eval losses to 1e-6."""
    (tmp_path / "fast").mkdir()
    (tmp_path / "plain").mkdir()
    fast, fast_env = _losses(tmp_path / "fast")
    plain, plain_env = _losses(
        tmp_path / "plain", "launch.cpu_fast_path=false", "launch.cpu_threads=1"
    )
    assert len(fast) == len(plain) == 4
    assert max(abs(a - b) for a, b in zip(fast, plain, strict=True)) < 1e-6
    assert plain_env["cpu"] == {
        "math_threads_per_process": 1,
        "mkl": "MKL default path (launch.cpu_fast_path=false)",
        "layers": CPU_LAYERS[False],
    }
    assert fast_env["cpu"]["layers"] == CPU_LAYERS[True]
    assert fast_env["cpu"]["math_threads_per_process"] == resolve_cpu_threads(
        "auto", 1, len(os.sched_getaffinity(0))
    )
    cpu = read_cpu_info()
    if cpu.vendor == "AuthenticAMD" and "avx2" in cpu.flags:
        assert fast_env["cpu"]["mkl"] == "MKL_DEBUG_CPU_TYPE=5 (set by ftlab: AMD CPU with AVX2)"
