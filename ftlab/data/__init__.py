"""The data pipeline: JSON-lines records -> tokenized, optionally packed training batches.

``ftlab.data.build.build_data`` is the entry point; ``ftlab.data.collate.count_tokens``
measures collated batches for throughput. See the module docstrings of ``examples`` (label
shift, truncation), ``collate`` (what the model receives) and ``packing``.

The package itself imports nothing: what composition and validation read (``splits``,
``formats``, ``settings``) stays free of Paddle, whose import prints warnings before
ftlab's console is set up, and every user names the module it imports from.
"""
