"""Command-line overrides that ftlab writes for Hydra, and reading one back from ``argv``.

ftlab passes values to other ``ftlab`` processes as Hydra overrides: the run dir to the
workers of a multi-process job (``hydra.run.dir=...``) and the run dir of a resume or a
rerun. A value is an arbitrary path; Hydra's override grammar gives ``=``, ``,``, spaces,
quotes and brackets a meaning, and OmegaConf gives ``${`` one. ``override`` quotes the
value so that the receiving process reads back exactly the same string. ``flatten`` names
every setting of a config tree by its dotted key, as overrides do (resume, rerun and the
nodes' config check compare configs that way).
"""

from __future__ import annotations

import re
from typing import Any

# Quoted strings in Hydra's grammar: a run of backslashes is literal unless it precedes a
# quote or ends the string, where 2n backslashes stand for n (and 2n+1 + quote for n + a
# literal quote). OmegaConf then treats 2n+1 backslashes before ``${`` as n + a literal ``${``.
_BEFORE_INTERPOLATION = re.compile(r"(\\*)\$\{")
_BEFORE_QUOTE = re.compile(r"(\\*)'")
_AT_END = re.compile(r"(\\+)$")


def quote(value: str) -> str:
    """``value`` as a single-quoted Hydra override value that resolves to ``value`` itself."""
    text = _BEFORE_INTERPOLATION.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    text = _BEFORE_QUOTE.sub(lambda m: "\\" * (2 * len(m.group(1)) + 1) + "'", text)
    text = _AT_END.sub(lambda m: "\\" * (2 * len(m.group(1))), text)
    return f"'{text}'"


def override(key: str, value: str) -> str:
    """``key='value'``, quoted so that any string survives Hydra's grammar."""
    return f"{key}={quote(str(value))}"


def given_value(argv: list[str], key: str) -> str | None:
    """The value ``argv`` gives ``key`` (the last one wins, as in Hydra), or None.

    Arguments that are not overrides (``-m``, ``--cfg job``) and overrides Hydra cannot
    parse are passed over: Hydra reports those itself.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    found = None
    for arg in argv:
        if arg.startswith("-") or not arg.split("=", 1)[0].lstrip("+~").startswith(key):
            continue
        try:
            parsed = parser.parse_override(arg)
        except HydraException:
            continue
        if parsed.key_or_group == key and not parsed.is_delete():
            value = parsed.value()
            found = None if value is None else str(value)
    return found


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: every leaf by its dotted key (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out
