"""The ``ftlab`` console: ftlab's own lines for a person; everything else in train.log.

Hydra configures logging for each job from ``conf/hydra/job_logging/ftlab.yaml``: a console
handler (stdout) behind ``ConsoleFilter`` and a file handler for ``<run dir>/train.log``
that takes every record. ``job_console`` wraps one job:

* the console shows the ``ftlab.console`` logger's lines (what was composed, the run dir,
  data and model counts, progress, evaluation, the summary) and every warning or error,
  ftlab's and the libraries', except known noise, which is filtered by name (``NOISE``: each
  entry names the logger, the message and why it is noise; train.log keeps it);
* Python warnings go through logging (``py.warnings``), so they meet the same filter;
* PaddleNLP's and Paddle's loggers, which print to stderr themselves and do not propagate,
  are routed into logging instead (``RoutedLogger``), so their records (the
  TrainingArguments dump included) land in train.log and their warnings meet the filter;
* while a training job runs, ``sys.stdout`` / ``sys.stderr`` are lines of the
  ``ftlab.stream`` logger, so prints of any library end up in train.log too;
* ``verbose=true`` shows everything on the console as well;
* a sweep job (``ftlab -m``) shows only warnings and errors; ``hydra_main`` prints one line
  per job, the sweep callback the summary;
* a worker of a multi-process run writes its complete log to ``<run dir>/logs/train.<rank>.log``
  and its console lines to its stdout (``logs/workerlog.<rank>``); the launcher echoes rank
  0's, so the console is rank 0's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ftlab.methods.catalog import get_method
from ftlab.training.progress import CONSOLE, configure_progress

STREAM = "ftlab.stream"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


@dataclass(frozen=True)
class Noise:
    """A known message that says nothing about this run: kept in train.log, not shown."""

    name: str
    logger: str  # the logger it comes from (a prefix)
    pattern: str  # searched in the message
    why: str

    def matches(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.logger):
            return False
        return re.search(self.pattern, record.getMessage()) is not None


NOISE: tuple[Noise, ...] = (
    Noise(
        "paddle-ccache",
        "py.warnings",
        r"No ccache found",
        "Paddle's C++ extension builder looks for ccache on import; ftlab builds no extension",
    ),
    Noise(
        "setuptools-distutils",
        "py.warnings",
        r"Setuptools is replacing distutils",
        "an import-time notice of setuptools, triggered by Paddle's imports",
    ),
    Noise(
        "paddle-incubate-swiglu",
        "py.warnings",
        r"paddle\.incubate\.nn\.functional\.swiglu.* is deprecated",
        "PaddleNLP 3.0.0b4's Llama calls Paddle's deprecated incubate swiglu; same kernel",
    ),
    Noise(
        "paddlenlp-lora-tp-reset",
        "PaddleNLP",
        r"Reset tensor_parallel_degree of \w+_config to 1",
        "PaddleNLP's LoRAModel says this for every single-device model",
    ),
    Noise(
        "paddlenlp-rope-strategy-buffers",
        "PaddleNLP",
        r"were not initialized from the model checkpoint .* newly initialized: "
        r"\[('[\w.]+\.rotary_emb\.inv_freq'(, )?)+\]",
        "with model.rope_scaling the strategy's rotary frequencies are computed in the "
        "constructor (tested against the formula), not read: PaddleNLP names them anyway",
    ),
    Noise(
        "paddlenlp-async-save",
        "PaddleNLP",
        r"Asynchronous saving is not supported for single card",
        "ftlab does not ask for asynchronous saving; PaddleNLP warns on every save",
    ),
    Noise(
        "paddlenlp-sharding-reshard",
        "PaddleNLP",
        r"sharding_parallel_degree=1 means no sharding",
        "PaddleNLP's notice when a layout has no sharding",
    ),
    Noise(
        "paddlenlp-empty-cache-cpu",
        "PaddleNLP",
        r"The current device \(cpu\) does not support empty cache",
        "a CPU has no device cache to empty; PaddleNLP's evaluation asks anyway",
    ),
    Noise(
        "paddle-rank-not-in-group",
        "py.warnings",
        r"Current global rank \d+ is not in group",
        "fleet creates every communication group on every rank, and Paddle warns on each",
    ),
    Noise(
        "paddle-reducer-unused-parameters",
        CONSOLE,
        r"All parameters are involved in the backward pass",
        "a C++ notice of Paddle's DataParallel (echoed from rank 0's log)",
    ),
    Noise(
        "paddle-glog-info",
        CONSOLE,
        r"^I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ",
        "Paddle's C++ INFO lines (gloo and TCP store set-up), echoed from rank 0's log",
    ),
    Noise(
        "hydra-job-announcement",
        "hydra",
        r"^\s*#\d+ : ",
        "Hydra's launcher names each sweep job as it starts; ftlab prints one line per job "
        "when it ends",
    ),
)


def ignore_noise_warnings() -> None:
    """Commands without a job console (``ftlab-import``, ``-predict``, ``-merge``): Python
    warnings that are known noise (``NOISE``) are not shown."""
    import warnings

    for noise in NOISE:
        if noise.logger == "py.warnings":  # (?s): Paddle's deprecation text spans lines
            warnings.filterwarnings("ignore", message=f"(?s).*{noise.pattern}")


def tool_console() -> None:
    """``ftlab-predict`` and ``ftlab-merge``: their own lines only. Library loggers
    (PaddleNLP's and Paddle's INFO lines about loading) reach one stderr handler that shows
    warnings and errors, known noise dropped, as the training console does."""
    ignore_noise_warnings()
    root = logging.getLogger()
    if any(isinstance(h, ToolHandler) for h in root.handlers):
        return  # once per process (tests call the commands' main() several times)
    logging.captureWarnings(True)
    route_library_loggers()
    logging.setLoggerClass(RoutedLogger)  # PaddleNLP's loggers are created on import
    handler = ToolHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.addFilter(NoiseFilter())
    handler.setFormatter(ConsoleFormatter())
    root.addHandler(handler)


class ToolHandler(logging.StreamHandler):
    """The stderr handler of ``tool_console``."""


@dataclass
class _State:
    verbose: bool = False
    sweep: bool = False


STATE = _State()


class ConsoleFilter(logging.Filter):
    """What reaches the console (see the module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if STATE.verbose:
            return True
        if any(n.matches(record) for n in NOISE):
            return False
        if record.levelno >= logging.WARNING:
            return True
        return not STATE.sweep and _console_record(record)


def _console_record(record: logging.LogRecord) -> bool:
    """A line of ftlab's console (``ftlab.console``, or a worker's echoed by its launcher)."""
    return record.name == CONSOLE or record.name.startswith(CONSOLE + ".")


class NoiseFilter(logging.Filter):
    """Drops ``NOISE`` only (Hydra's own console, ``conf/hydra/hydra_logging/ftlab.yaml``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return STATE.verbose or not any(n.matches(record) for n in NOISE)


class ConsoleFormatter(logging.Formatter):
    """ftlab's lines as they are; warnings prefixed; other records (verbose) with their
    logger name."""

    def format(self, record: logging.LogRecord) -> str:
        message = _plain(record.getMessage())
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if _console_record(record) and record.levelno < logging.WARNING:
            return message
        if record.name == "py.warnings":  # "file:line: Category: text\n  source line"
            first = message.strip().splitlines()[0]
            where, _, text = first.partition(": ")
            return f"warning: {text.strip()} ({where})"
        if record.levelno >= logging.WARNING:
            level = "error" if record.levelno >= logging.ERROR else "warning"
            source = "" if record.name.startswith("ftlab") else f"{record.name}: "
            return f"{level}: {source}{message}"
        return message if record.name.startswith(STREAM) else f"[{record.name}] {message}"


class PlainFormatter(logging.Formatter):
    """train.log's lines, without terminal colour codes."""

    def format(self, record: logging.LogRecord) -> str:
        return _plain(super().format(record))


def _plain(text: str) -> str:
    """Without terminal colour codes (PaddleNLP colours its lines)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class LogStream:
    """A text stream whose lines become records of ``ftlab.stream.<name>``."""

    def __init__(self, name: str, original: IO[str]) -> None:
        self.log = logging.getLogger(f"{STREAM}.{name}")
        self.original = original
        self.buffer = ""
        self.busy = False

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = re.split(r"[\r\n]", self.buffer)
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        self._emit(self.buffer)
        self.buffer = ""

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        if self.busy:  # a handler failing while it writes reports on this stream
            self.original.write(line + "\n")
            return
        self.busy = True
        try:
            self.log.info(_plain(line.rstrip()))
        finally:
            self.busy = False

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.original.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.original, "encoding", "utf-8")


def _terminal(stream: Any) -> bool:
    return isinstance(stream, LogStream) or stream in (
        sys.__stdout__,
        sys.__stderr__,
        sys.stdout,
        sys.stderr,
    )


class RoutedLogger(logging.Logger):
    """The class of loggers created while a job runs. Libraries (PaddleNLP, Paddle, VisualDL)
    give their loggers a terminal handler of their own and turn propagation off; here that
    handler is not attached and propagation stays on, so their records reach ftlab's console
    filter and train.log like any other."""

    def addHandler(self, hdlr: logging.Handler) -> None:  # noqa: N802 - logging's name
        if type(hdlr) is logging.StreamHandler and _terminal(hdlr.stream):
            return
        super().addHandler(hdlr)

    @property  # type: ignore[override]
    def propagate(self) -> bool:
        return True

    @propagate.setter
    def propagate(self, value: bool) -> None:
        pass


def route_library_loggers() -> list[str]:
    """Existing loggers that print to the terminal themselves now propagate to ftlab's
    handlers instead (loggers created later are ``RoutedLogger``); returns their names."""
    routed = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or name.startswith(("ftlab", "hydra")):
            continue
        own = [
            h
            for h in logger.handlers
            if type(h) is logging.StreamHandler and _terminal(getattr(h, "stream", None))
        ]
        for handler in own:
            logger.removeHandler(handler)
        if own or not logger.propagate:
            logger.propagate = True
            routed.append(name)
    return routed


def _rank() -> int:
    return int(os.environ.get("PADDLE_TRAINER_ID", "0") or 0)


@contextlib.contextmanager
def job_console(
    cfg: Any, run_dir: Path, sweep: bool = False, worker: bool = False
) -> Iterator[None]:
    """The console of one job (see the module docstring); restores the streams after."""
    verbose = bool(cfg.get("verbose", False))
    training = cfg.get("mode", "train") == "train"
    STATE.verbose, STATE.sweep = verbose, sweep
    # captureWarnings(True) does nothing while an earlier hook is recorded, even when
    # warnings.showwarning was replaced since (an in-process ftlab-predict, then a test
    # harness's own capture): drop the stale hook, then hook this job's warnings.
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    terminal = sys.stdout
    rank_file = None
    if worker:
        # Every rank's complete log in the run dir; the launcher's is train.log.
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        rank_file = logging.FileHandler(run_dir / "logs" / f"train.{_rank()}.log")
        rank_file.setFormatter(PlainFormatter(FILE_FORMAT))
        logging.getLogger().addHandler(rank_file)
    route_library_loggers()
    logging.setLoggerClass(RoutedLogger)  # PaddleNLP's and Paddle's, created on import
    configure_progress(enabled=not sweep and _rank() == 0, stream=terminal)
    saved = sys.stdout, sys.stderr
    if training:
        sys.stdout, sys.stderr = LogStream("stdout", saved[0]), LogStream("stderr", saved[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, LogStream):
                stream.flush()
        sys.stdout, sys.stderr = saved
        logging.setLoggerClass(logging.Logger)
        configure_progress(enabled=True, stream=None)
        if rank_file is not None:
            logging.getLogger().removeHandler(rank_file)
            rank_file.close()


def describe_run(run: Any, derived: Any, run_dir: Path) -> str:
    """The lines that say what was composed and where the run dir is."""
    method = run.method.name
    size = get_method(method).size_setting

    def words(key: str) -> str:  # lora_alpha -> alpha (the method is named already)
        return key.removeprefix("lora_").removeprefix(f"{method}_").replace("_", " ")

    detail = [f"{words(size)} {getattr(run.method, size)}"] if size else []
    detail += [f"{words(k)} {v:g}" for k, v in derived.method.items() if _number(v)]
    detail += [f"{words(k)} {v}" for k, v in derived.method.items() if not _number(v)]
    layout = run.parallel.name
    if derived.world_size > 1:
        layout += f" ({derived.world_size} processes)"
    lines = [
        f"ftlab  model {run.model.name}  method {method}"
        + (f" ({', '.join(detail)})" if detail else "")
        + f"  data {run.data.name}",
        f"       parallel {layout}  precision {run.precision.name}  device {derived.device}"
        + f"  mode {run.mode}",
        f"       run dir {_relative(run_dir)}"
        + ("  (full log: train.log)" if run.mode == "train" else ""),
    ]
    return "\n".join(lines)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def job_line(num: int, overrides: Any, outcome: Any, started: float) -> str:
    """A sweep job's one console line, once it has ended."""
    import time

    parts = [f"job {num} done in {time.time() - started:.0f} s: {' '.join(overrides) or '-'}"]
    for key, title, spec in (
        ("final_loss", "loss", ".4f"),
        ("eval_loss", "eval loss", ".4f"),
        ("entity_recall", "entity recall", ".3f"),
    ):
        value = getattr(outcome, key, None)
        if value is not None:
            parts.append(f"{title} {value:{spec}}")
    return "  ".join(parts)
