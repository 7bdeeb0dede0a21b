"""What a training run says on the console: ftlab's console logger and its progress settings.

Lines a person should read go to the ``ftlab.console`` logger (the CLI's console shows
them, ``<run dir>/train.log`` keeps them with everything else); training progress is one
bar on a terminal (loss, learning rate, tokens/s, time left), or one line per logging step
when the output is a file or a pipe (``training.trainer.ConsoleProgress``). PaddleNLP's own
bars are off (``disable_tqdm``); its log lines still reach train.log. No Paddle import here:
the CLI reads this module before anything heavy loads.
"""

from __future__ import annotations

from typing import IO, Any

from ftlab import CONSOLE, console

__all__ = ["CONSOLE", "configure_progress", "console", "duration", "progress_settings"]

# Set by the ftlab command for each job: whether to show progress, and the terminal stream
# (the process's own stdout may be redirected into train.log while a job runs).
progress_settings: dict[str, Any] = {"enabled": True, "stream": None}


def configure_progress(enabled: bool, stream: IO[str] | None = None) -> None:
    progress_settings.update(enabled=enabled, stream=stream)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}".removeprefix("0:")
