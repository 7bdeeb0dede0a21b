"""CPU emulation of tensor-parallel layouts: gloo stand-ins for the ops Paddle's CPU build lacks.

``parallel.cpu_emulation=true`` lets a tensor-parallel layout run as gloo processes on a
CPU machine, to test a layout (shapes, splits, losses) before spending GPU hours. It is a
correctness tool, not a fast path. What the CPU build is missing, and the stand-in:

* ``c_identity`` (identity forward, all-reduce of the gradient), ``c_concat`` (gather the
  last dimension) and ``c_split`` have no CPU kernels: PyLayers built from plain gloo
  collectives replace ``mp_ops._c_identity``, ``_c_concat`` and ``_c_split``.
* gloo has no calc-stream all-reduce (``mp_ops._mp_allreduce`` uses one): replaced by a
  synchronous ``all_reduce``.
* ``broadcast_input_data`` accepts only GPU/XPU tensors: replaced by synchronous
  broadcasts from the model-parallel source rank.
* ``c_softmax_with_cross_entropy`` (the vocabulary-parallel loss) has no CPU kernel: the
  model is built with ``tensor_parallel_output=False``, which gathers the logits first and
  uses the ordinary loss.

Pipeline layouts are not covered (see ``check_emulation``).
"""

from __future__ import annotations

import logging
from typing import Any

from ftlab.config.schema import RunConfig
from ftlab.errors import ConfigError

log = logging.getLogger(__name__)

_installed = False


def check_emulation(run: RunConfig) -> None:
    """Layouts the emulation cannot run yet, refused with what is missing."""
    p = run.parallel
    if p.pipeline > 1:
        raise ConfigError(
            f"parallel={p.name} with parallel.cpu_emulation=true: pipeline parallelism is not "
            "emulated on CPU yet (PaddleNLP's LlamaForCausalLMPipe needs a device id the CPU "
            "build lacks, and both stages' first p2p sends deadlock under gloo). Run it on "
            "GPUs, or test the tensor-parallel part alone (parallel=tp2)."
        )
    if p.sharding_stage in (2, 3):
        raise ConfigError(
            f"parallel={p.name} with parallel.cpu_emulation=true: sharding stage "
            f"{p.sharding_stage} asserts a GPU and is not emulated. Use sharding_stage1 on CPU."
        )
    if p.sequence_parallel:
        raise ConfigError(
            f"parallel={p.name}: sequence parallelism is not emulated on CPU (its "
            "reduce-scatter/all-gather ops have no CPU kernels). Set "
            "parallel.sequence_parallel=false to emulate the tensor-parallel part."
        )


def _group(group: Any) -> Any:
    import paddle.distributed as dist

    return group if group is not None else dist.collective._get_default_group()


def _all_reduce(x: Any, group: Any) -> Any:
    import paddle.distributed as dist

    out = x.clone()
    dist.all_reduce(out, group=group, sync_op=True)
    return out


def _gather_last(x: Any, group: Any) -> Any:
    import paddle
    import paddle.distributed as dist

    parts: list = []
    dist.all_gather(
        parts, x.contiguous() if hasattr(x, "contiguous") else x, group=group, sync_op=True
    )
    return paddle.concat(parts, axis=-1)


def _split_last(x: Any, group: Any) -> Any:
    import paddle

    return paddle.split(x, group.nranks, axis=-1)[group.rank].clone()


def _make_pylayers() -> dict[str, Any]:
    from paddle.autograd import PyLayer

    class Identity(PyLayer):  # c_identity: copy forward, all-reduce the gradient
        @staticmethod
        def forward(ctx: Any, x: Any, group: Any, skip: bool) -> Any:
            ctx.group, ctx.skip = group, skip
            return x.clone()

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            return dy if ctx.skip else _all_reduce(dy, ctx.group)

    class AllReduce(PyLayer):  # mp_allreduce: all-reduce forward, identity backward
        @staticmethod
        def forward(ctx: Any, x: Any, group: Any) -> Any:
            return _all_reduce(x, group)

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            return dy.clone()

    class Concat(PyLayer):  # c_concat: gather the last dim, backward keeps own slice
        @staticmethod
        def forward(ctx: Any, x: Any, group: Any) -> Any:
            ctx.group = group
            return _gather_last(x, group)

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            return _split_last(dy, ctx.group)

    class Split(PyLayer):  # c_split: keep own slice of the last dim, backward gathers
        @staticmethod
        def forward(ctx: Any, x: Any, group: Any) -> Any:
            ctx.group = group
            return _split_last(x, group)

        @staticmethod
        def backward(ctx: Any, dy: Any) -> Any:
            return _gather_last(dy, ctx.group)

    return {"Identity": Identity, "AllReduce": AllReduce, "Concat": Concat, "Split": Split}


def install_cpu_shims() -> None:
    """Patch Paddle's model-parallel ops with gloo stand-ins (idempotent, this process)."""
    global _installed
    if _installed:
        return
    import paddle.distributed as dist
    from paddle.distributed import collective
    from paddle.distributed.fleet.layers.mpu import mp_ops
    from paddle.distributed.fleet.meta_parallel import tensor_parallel
    from paddle.distributed.fleet.utils import hybrid_parallel_util

    layers = _make_pylayers()

    def c_identity(tensor: Any, group: Any = None, skip_c_identity_dynamic: bool = False) -> Any:
        return layers["Identity"].apply(tensor, _group(group), skip_c_identity_dynamic)

    def mp_allreduce(
        tensor: Any,
        op: Any = None,
        group: Any = None,
        use_calc_stream: bool = True,
        use_model_parallel: bool = True,
        skip_c_identity_dynamic: bool = False,
    ) -> Any:
        if op is not None and op != dist.ReduceOp.SUM:
            raise ValueError(f"cpu emulation: _mp_allreduce supports SUM only, got {op}")
        return layers["AllReduce"].apply(tensor, _group(group))

    def c_concat(tensor: Any, group: Any = None) -> Any:
        return layers["Concat"].apply(tensor, _group(group))

    def c_split(tensor: Any, group: Any = None) -> Any:
        return layers["Split"].apply(tensor, _group(group))

    def broadcast_input_data(hcg: Any, *inputs: Any, **kwargs: Any) -> Any:
        group = hcg.get_model_parallel_group()
        src = hcg.get_model_parallel_group_src_rank()

        def visit(x: Any) -> None:
            if isinstance(x, dict):
                for v in x.values():
                    visit(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    visit(v)
            elif hasattr(x, "place") and hasattr(x, "shape"):
                dist.broadcast(x, src=src, group=group, sync_op=True)

        visit(inputs)
        visit(kwargs)
        return inputs, kwargs

    for module in (mp_ops, collective):
        module._c_identity = c_identity
        module._mp_allreduce = mp_allreduce
        module._c_concat = c_concat
        module._c_split = c_split
    hybrid_parallel_util.broadcast_input_data = broadcast_input_data
    tensor_parallel.broadcast_input_data = broadcast_input_data
    _installed = True
    log.info(
        "cpu emulation: gloo stand-ins for c_identity, c_concat, c_split, mp_allreduce "
        "and broadcast_input_data installed"
    )
