"""The ``parallel`` group -> PaddleNLP's degrees (from which its TrainingArguments build the
fleet strategy), and this job's degrees read back from fleet while the model is built."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ftlab.config.schema import ParallelConfig
from ftlab.distributed.degrees import Degrees


def processes_per_node(p: ParallelConfig) -> int:
    """``parallel.nproc_per_node``, or unset: the product of the degrees, on one node."""
    return p.nproc_per_node or p.tensor * p.pipeline * p.sharding * (p.data or 1)


def parallel_degrees(p: ParallelConfig, nnodes: int, nproc_per_node: int | None = None) -> Degrees:
    """The ``parallel`` group's degrees on ``nnodes`` nodes of ``nproc_per_node`` processes
    (default: ``processes_per_node``). The data degree is what the world size leaves
    (``parallel.data`` must equal it; validation refuses a remainder or a mismatch)."""
    nproc = nproc_per_node or processes_per_node(p)
    return Degrees(
        nproc_per_node=nproc,
        nnodes=nnodes,
        data=nproc * nnodes // (p.tensor * p.pipeline * p.sharding),
        tensor=p.tensor,
        pipeline=p.pipeline,
        sharding=p.sharding,
        sharding_stage=p.sharding_stage,
        offload=p.offload,
        sequence_parallel=p.sequence_parallel,
        expert=p.expert,
    )


def with_degrees(p: ParallelConfig, degrees: Degrees) -> ParallelConfig:
    """``p`` with ``degrees`` written in, as if the user had typed them (``launch.nnodes``
    holds the nodes)."""
    kwargs = degrees.as_kwargs()
    del kwargs["nnodes"]
    return replace(p, **kwargs)


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
    if p.expert > 1:
        # PaddleNLP 3.0.0b4 places the experts across the data-parallel group itself; the
        # flag keeps expert gradients rank-local and saves every rank's experts. (Its
        # expert_parallel_degree argument asserts data parallel == 1, so it stays unset.)
        args["use_expert_parallel"] = True
    if p.sharding_stage:
        args["sharding"] = f"stage{p.sharding_stage}" + (" offload" if p.offload else "")
        args["sharding_parallel_degree"] = p.sharding
    return args


PARALLEL_KEYS = (
    "tensor_parallel_degree",
    "sequence_parallel",
    "pipeline_parallel_degree",
    "sharding",
    "sharding_parallel_degree",
)


def parallel_from_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """The inverse of ``parallel_training_arguments``: ``parallel.*`` settings from
    TrainingArguments values. ``sharding`` is None when the arguments leave the sharding
    degree to PaddleNLP (-1: every data-parallel rank, known only at launch)."""
    sharding = args.get("sharding") or ""
    words = (sharding if isinstance(sharding, str) else " ".join(sharding)).split()
    stages = [int(w[len("stage") :]) for w in words if w.startswith("stage")]
    degree = int(args.get("sharding_parallel_degree") or -1)
    return {
        "tensor": max(int(args.get("tensor_parallel_degree") or 1), 1),
        "sequence_parallel": bool(args.get("sequence_parallel")),
        "pipeline": max(int(args.get("pipeline_parallel_degree") or 1), 1),
        "sharding_stage": max(stages, default=0),
        "offload": "offload" in words,
        "sharding": degree if degree > 0 else (None if stages else 1),
    }


def _hybrid_group() -> Any:
    """Fleet's hybrid communicate group, or None outside a hybrid-parallel job."""
    from paddle.distributed import fleet

    try:
        return fleet.get_hybrid_communicate_group()
    except AttributeError:  # fleet not initialised: a single process
        return None


def pipeline_degree() -> int:
    """Pipeline stages of this job (1 outside a pipeline-parallel job), read from fleet."""
    hcg = _hybrid_group()
    return max(hcg.get_pipe_parallel_world_size(), 1) if hcg is not None else 1


def model_parallel_kwargs() -> dict[str, Any]:
    """Config overrides that make PaddleNLP build (and split on load) tensor-parallel layers.

    Read from fleet's hybrid communicate group, which PaddleNLP's TrainingArguments create;
    empty outside a tensor-parallel job. Logits stay gathered (``tensor_parallel_output``
    false, PaddleNLP's fine-tuning default), so the ordinary loss applies.
    """
    hcg = _hybrid_group()
    if hcg is None or hcg.get_model_parallel_world_size() <= 1:
        return {}
    return {
        "tensor_parallel_degree": hcg.get_model_parallel_world_size(),
        "tensor_parallel_rank": hcg.get_model_parallel_rank(),
        "tensor_parallel_output": False,
    }
