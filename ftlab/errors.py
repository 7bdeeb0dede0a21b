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
