"""The data pipeline: JSON-lines records -> tokenized, optionally packed training batches.

``build_data`` is the entry point; ``count_tokens`` measures collated batches for
throughput. See the module docstrings of ``examples`` (label shift, truncation),
``collate`` (what the model receives) and ``packing``.

The names below are imported from their submodules on first use, so that the Paddle-free
modules (``layout``, ``formats``, ``settings``: what composition and validation read) do
not import Paddle, whose import prints warnings before ftlab's console is set up.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULE = {
    "DataBundle": "bundle",
    "build_data": "build",
    "Collator": "collate",
    "count_tokens": "collate",
    "DataStats": "stats",
    "SplitStats": "stats",
}

__all__ = sorted(_SUBMODULE)


def __getattr__(name: str) -> Any:
    if name not in _SUBMODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"ftlab.data.{_SUBMODULE[name]}"), name)
