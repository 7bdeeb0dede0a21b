"""The ``parallel`` group -> PaddleNLP TrainingArguments (which build the fleet strategy)."""

from __future__ import annotations

from typing import Any

from ftlab.config.schema import ParallelConfig


def parallel_training_arguments(p: ParallelConfig) -> dict[str, Any]:
    """Degrees and sharding flags as PaddleNLP's TrainingArguments name them.

    PaddleNLP derives the data-parallel degree from the world size itself; ftlab derives
    the same number in validation and records it in the resolved config.
    """
    args: dict[str, Any] = {}
    if p.tensor > 1:
        args["tensor_parallel_degree"] = p.tensor
        args["sequence_parallel"] = p.sequence_parallel
    if p.pipeline > 1:
        args["pipeline_parallel_degree"] = p.pipeline
    if p.sharding_stage:
        args["sharding"] = f"stage{p.sharding_stage}" + (" offload" if p.offload else "")
        args["sharding_parallel_degree"] = p.sharding
    return args
