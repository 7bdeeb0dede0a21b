"""Errors ftlab reports to the user as one clean message (no traceback).

Each message names the setting or input at fault, why it cannot work, and what to do.
"""


class FtlabError(Exception):
    """Base class: the CLI prints ``str(err)`` and exits with status 2."""


class ConfigError(FtlabError):
    """A setting, or a combination of settings, that cannot work."""


class DataError(FtlabError):
    """Input data that is missing, malformed or does not fit the settings."""


class ModelLoadError(FtlabError):
    """A model or tokenizer that cannot be found or loaded."""


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped the run; the CLI records where it was.

    A ``KeyboardInterrupt``, so that code which cleans up on Ctrl-C (data loader workers,
    the launcher's subprocess) does so for every signal ftlab turns into one.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)
