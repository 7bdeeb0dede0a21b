"""``Degrees``: how a job's processes divide the work, the one type every planner shares.

The layout derivation (``ftlab.distributed.layout.parallel_degrees``), ``parallel=auto``'s
candidates, the plan's ``Layout`` and the cost model's ``Shape`` all carry these numbers;
the last three extend ``Degrees`` with what they add (the batch split, the verdict, the
recompute share), so a layout passes from one to the next whole, never field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Degrees:
    """``nnodes`` x ``nproc_per_node`` processes = data x sharding x pipeline x tensor ranks.

    PaddleNLP orders the hybrid groups dp, pp, sharding, mp from outermost to innermost.
    ``offload`` belongs to sharding (stage 2/3 keep optimizer states on the host);
    ``sequence_parallel`` to tensor parallelism; ``expert`` splits a mixture-of-experts
    model's routed experts across the data-parallel group (PaddleNLP 3.0.0b4), so it is
    not a factor of the world size.
    """

    nproc_per_node: int = 1
    nnodes: int = 1
    data: int = 1
    tensor: int = 1
    pipeline: int = 1
    sharding: int = 1
    sharding_stage: int = 0  # 0 (off) | 1 | 2 | 3
    offload: bool = False
    sequence_parallel: bool = False
    expert: int = 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def model_parallel_size(self) -> int:
        """Ranks that split one copy of the model's layers: tensor x pipeline."""
        return self.tensor * self.pipeline

    @property
    def data_parallel_world(self) -> int:
        """Ranks that each train their own share of a batch: data x sharding."""
        return self.data * self.sharding

    @property
    def degrees(self) -> Degrees:
        """Only the degrees (of a type that extends them)."""
        return Degrees(**self.as_kwargs())

    def as_kwargs(self) -> dict[str, Any]:
        """The degrees as keyword arguments: of a type extending ``Degrees``, or of
        ``dataclasses.replace`` on a ``ParallelConfig`` (same names, but ``nnodes``)."""
        return {f.name: getattr(self, f.name) for f in fields(Degrees)}

    @property
    def layout_label(self) -> str:
        """The parallel layout in short: ``tp2 pp2 sharding2/stage1 dp2 sp offload``."""
        parts = []
        if self.tensor > 1:
            parts.append(f"tp{self.tensor}")
        if self.pipeline > 1:
            parts.append(f"pp{self.pipeline}")
        if self.sharding > 1:
            parts.append(f"sharding{self.sharding}/stage{self.sharding_stage}")
        if self.data > 1:
            parts.append(f"dp{self.data}")
        if self.sequence_parallel:
            parts.append("sp")
        if self.offload:
            parts.append("offload")
        return " ".join(parts) or "single"
