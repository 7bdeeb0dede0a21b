"""Settings with a fixed set of values: one check, one message, with the closest names.

They stay plain strings (not Enums) so YAML and overrides read naturally.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from ftlab.errors import ConfigError, FtlabError


def suggest(value: str, choices: Sequence[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (empty when none is close)."""
    close = difflib.get_close_matches(value, list(choices), n=2, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def check_choice(
    key: str, value: object, choices: Sequence[str], error: type[FtlabError] = ConfigError
) -> None:
    """Raise ``error`` naming ``key`` and the valid values when ``value`` is not one."""
    if value not in choices:
        raise error(
            f"{key}={value!r} is not one of {', '.join(choices)}.{suggest(str(value), choices)}"
        )
