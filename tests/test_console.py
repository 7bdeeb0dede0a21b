"""The console: ftlab's lines and real warnings shown, known noise filtered by name,
libraries' loggers and prints routed into train.log (the real runs: test_e2e, test_sweep,
test_distributed)."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
from helpers import compose_run

from ftlab import CONSOLE
from ftlab.cli.console import (
    NOISE,
    STATE,
    ConsoleFilter,
    ConsoleFormatter,
    LogStream,
    RoutedLogger,
    describe_run,
    job_console,
    job_line,
)
from ftlab.record.summary import Summary
from ftlab.resolve.validate import validate

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

# One message each noise entry is for, as the library writes it.
NOISE_SAMPLES = {
    "paddle-ccache": "/x/extension_utils.py:712: UserWarning: No ccache found. Please be aware",
    "setuptools-distutils": "/x/__init__.py:33: UserWarning: Setuptools is replacing distutils.",
    "paddle-incubate-swiglu": 'API "paddle.incubate.nn.functional.swiglu.swiglu" is deprecated',
    "paddlenlp-lora-tp-reset": "Reset tensor_parallel_degree of lora_config to 1.",
    "paddlenlp-async-save": "Asynchronous saving is not supported for single card environment",
    "paddlenlp-sharding-reshard": "sharding_parallel_degree=1 means no sharding, please set it",
    "paddlenlp-empty-cache-cpu": "The current device (cpu) does not support empty cache, calling",
    "paddle-rank-not-in-group": "/x/group.py:1: UserWarning: Current global rank 0 is not in group",
    "paddle-reducer-unused-parameters": "W1128 09:04:06.345512 22297 reducer.cc:736] All "
    "parameters are involved in the backward pass. It is recommended",
    "paddle-glog-info": "I1128 09:04:00.806144 22297 tcp_store.cc:336] create libuv server",
    "hydra-job-announcement": "\t#0 : method.lora_rank=2",
    "paddlenlp-rope-strategy-buffers": "Some weights of LlamaForCausalLM were not initialized "
    "from the model checkpoint at /m and are newly initialized: ['llama.layers.0.self_attn."
    "rotary_emb.inv_freq', 'llama.layers.1.self_attn.rotary_emb.inv_freq']",
}


def record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


@pytest.fixture(autouse=True)
def quiet_state():
    saved = STATE.verbose, STATE.sweep
    STATE.verbose = STATE.sweep = False
    yield
    STATE.verbose, STATE.sweep = saved


def test_every_noise_entry_matches_its_message_and_nothing_real() -> None:
    assert {n.name for n in NOISE} == set(NOISE_SAMPLES)
    for noise in NOISE:
        assert noise.why and noise.matches(
            record(
                noise.logger + ".x" if noise.logger == CONSOLE else noise.logger,
                30,
                NOISE_SAMPLES[noise.name],
            )
        ), noise.name
    real = [
        record("py.warnings", 30, "/x/a.py:1: UserWarning: tokenizer has no chat template"),
        record("PaddleNLP", 30, "Some weights of the model checkpoint were not used"),
        record(  # a real weight left at random: shown
            "PaddleNLP",
            30,
            "Some weights of LlamaForCausalLM were not initialized from the model checkpoint "
            "at /m and are newly initialized: ['llama.layers.0.self_attn.rotary_emb.inv_freq', "
            "'lm_head.weight']",
        ),
        record("ftlab.data.build", 30, "skipped: train.json:3: not valid JSON"),
    ]
    assert not any(n.matches(r) for n in NOISE for r in real)


def test_filter_shows_ftlab_lines_and_real_warnings_only() -> None:
    shown = ConsoleFilter().filter
    assert shown(record(CONSOLE, 20, "data   train 2,000 examples"))
    assert shown(record(f"{CONSOLE}.rank0", 20, "step   2/4  loss 1.8965"))
    assert shown(record("ftlab.data.build", 30, "skipped: train.json:3: not valid JSON"))
    assert shown(record("PaddleNLP", 30, "Some weights of the model were not used"))
    assert not shown(record("ftlab.data.build", 20, "data train: 2000 examples from 2000"))
    assert not shown(record("PaddleNLP", 10, "    Training Configuration Arguments    "))
    assert not shown(record("ftlab.stream.stderr", 20, "TrainProcess: 10%"))
    assert not shown(record("PaddleNLP", 30, NOISE_SAMPLES["paddlenlp-async-save"]))
    STATE.sweep = True  # a sweep job: warnings and errors only
    assert not shown(record(CONSOLE, 20, "data   train 2,000 examples"))
    assert shown(record("ftlab.cli.app", 40, "job 2 failed: ConfigError"))
    STATE.sweep, STATE.verbose = False, True  # verbose=true: everything, noise included
    assert shown(record("PaddleNLP", 10, "Training Configuration Arguments"))
    assert shown(record("PaddleNLP", 30, NOISE_SAMPLES["paddlenlp-async-save"]))


def test_formatter() -> None:
    fmt = ConsoleFormatter().format
    assert fmt(record(CONSOLE, 20, "\x1b[32mdata   train\x1b[0m")) == "data   train"
    assert fmt(record("ftlab.training", 30, "rerun differs")) == "warning: rerun differs"
    assert fmt(record("PaddleNLP", 40, "boom")) == "error: PaddleNLP: boom"
    w = "/x/a.py:7: UserWarning: no chat template\n  warnings.warn(msg)"
    assert fmt(record("py.warnings", 30, w)) == "warning: UserWarning: no chat template (/x/a.py:7)"


def test_routed_logger_keeps_library_records_in_logging() -> None:
    """A library logger made during a job keeps no terminal handler and propagates."""
    logger = RoutedLogger("some_library")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    file_handler = logging.FileHandler("/dev/null")
    logger.addHandler(file_handler)
    logger.propagate = False  # what PaddleNLP's and Paddle's loggers do
    assert logger.handlers == [file_handler] and logger.propagate is True
    file_handler.close()


def test_log_stream_turns_prints_into_records(caplog) -> None:
    stream = LogStream("stdout", sys.__stdout__)
    with caplog.at_level(logging.INFO, logger="ftlab.stream"):
        stream.write("one\x1b[0m\ntw")
        stream.write("o\r")
        stream.write("three")
        stream.flush()
    assert [r.getMessage() for r in caplog.records] == ["one", "two", "three"]
    assert not stream.isatty() and stream.fileno() == sys.__stdout__.fileno()


def test_job_console_routes_warnings_and_prints_to_the_log(tmp_path: Path, caplog) -> None:
    cfg = {"verbose": False, "mode": "train"}
    # The warning filters are the process's: a test file run earlier on this worker may
    # have set RuntimeWarning to "ignore" or shown this warning already; start from "always".
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("always")
        with job_console(cfg, tmp_path):
            print("a library print")
            warnings.warn("a real warning", RuntimeWarning, stacklevel=1)
            late = logging.getLogger("library_made_during_the_job")
            late.addHandler(logging.StreamHandler())
            late.propagate = False
            late.warning("its warning")
    names = {(r.name, r.getMessage().splitlines()[0]) for r in caplog.records}
    assert ("ftlab.stream.stdout", "a library print") in names
    assert any(n == "py.warnings" and "a real warning" in m for n, m in names)
    assert ("library_made_during_the_job", "its warning") in names
    assert logging.getLoggerClass() is logging.Logger and not isinstance(sys.stdout, LogStream)


def test_describe_run_and_job_line() -> None:
    run = compose_run(["method=qlora", "parallel=dp2"])
    text = describe_run(run, validate(run, __import__("helpers").CPU), Path("outputs/x"))
    assert text.splitlines()[0].startswith("ftlab  model stories260k  method qlora (rank 8")
    assert "quant backend ftlab" in text and "parallel dp2 (2 processes)" in text
    assert "run dir outputs/x  (full log: train.log)" in text
    line = job_line(3, ["method.lora_rank=4"], Summary(eval_loss=0.5, entity_recall=0.75), 0.0)
    assert line.startswith("job 3 done in ") and "method.lora_rank=4" in line
    assert "eval loss 0.5000" in line and "entity recall 0.750" in line


def test_job_console_routes_warnings_after_an_earlier_capture(tmp_path: Path, caplog) -> None:
    """``logging.captureWarnings(True)`` does nothing while an earlier hook is recorded, even
    if ``warnings.showwarning`` was replaced since (an in-process ``ftlab-predict`` main,
    then pytest's per-test capture): the job must still route its warnings to the log."""
    cfg = {"verbose": False, "mode": "train"}
    logging.captureWarnings(True)  # the earlier caller's hook, never undone
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda *args, **kwargs: None  # replaced since
            with job_console(cfg, tmp_path):
                warnings.warn("after an earlier capture", RuntimeWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    names = {(r.name, r.getMessage().splitlines()[0]) for r in caplog.records}
    assert any(n == "py.warnings" and "after an earlier capture" in m for n, m in names)
