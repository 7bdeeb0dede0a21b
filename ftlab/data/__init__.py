"""The data pipeline: JSON-lines records -> tokenized, optionally packed training batches.

``build_data`` is the entry point; ``count_tokens`` measures collated batches for
throughput. See the module docstrings of ``examples`` (label shift, truncation),
``collate`` (what the model receives) and ``packing``.
"""

from ftlab.data.build import DataBundle, build_data
from ftlab.data.collate import Collator, count_tokens
from ftlab.data.stats import DataStats, SplitStats

__all__ = ["Collator", "DataBundle", "DataStats", "SplitStats", "build_data", "count_tokens"]
