"""Converters from other checkpoint formats to PaddleNLP checkpoint directories.

``convert_llama2c`` is imported lazily so that ``python -m ftlab.convert.llama2c`` does not
find its own module already imported by the package (runpy warns about that).
"""

from __future__ import annotations

from typing import Any

__all__ = ["convert_llama2c"]


def __getattr__(name: str) -> Any:
    if name == "convert_llama2c":
        from ftlab.convert.llama2c import convert_llama2c

        return convert_llama2c
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
