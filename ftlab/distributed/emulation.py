"""CPU emulation of tensor- and pipeline-parallel layouts: gloo stand-ins for missing ops.

``parallel.cpu_emulation=true`` lets a tensor-parallel or a pipeline-parallel layout run as
gloo processes on a CPU machine, to test a layout (shapes, splits, losses) before spending
GPU hours. It is a correctness tool, not a fast path. What the CPU build is missing, and
the stand-in:

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
* Pipeline: ``PipelineLayer.__init__`` reads ``ParallelEnv().device_id``, which is set for
  GPU/XPU/custom devices only (``AttributeError: _device_id`` on CPU): while a
  PipelineLayer is built, ``ParallelEnv`` answers device 0 (the value is only stored).
* Pipeline: the stages exchange activations and gradients with batched calc-stream
  send/recv (``p2p_communication._batched_p2p_ops``), which gloo does not implement, and
  blocking sends deadlock when two neighbouring stages both send first: replaced by
  synchronous ``send``/``recv`` in rank-parity order (even stages send, then receive; odd
  stages receive, then send), the order Paddle itself uses for unbatched p2p.

Layouts that combine tensor and pipeline parallelism are not covered (see
``check_emulation``).
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
    if p.pipeline > 1 and p.tensor > 1:
        raise ConfigError(
            f"parallel={p.name} with parallel.cpu_emulation=true: tensor {p.tensor} x pipeline "
            f"{p.pipeline} together is not emulated on CPU (the pipeline stand-ins send whole "
            "activations and were checked for pipeline-only layouts). Test the two parts "
            "separately (parallel=tp2 and parallel=pp2), or run this layout on GPUs."
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


def _install_pipeline_shims() -> None:
    from paddle.distributed import ParallelEnv
    from paddle.distributed.fleet.meta_parallel.parallel_layers import pp_layers

    pipeline_init = pp_layers.PipelineLayer.__init__

    def init_with_device_id(self: Any, *args: Any, **kwargs: Any) -> None:
        # ParallelEnv sets _device_id for GPU/XPU/custom devices only; PipelineLayer reads
        # it (and only stores it). The CPU is device 0.
        if hasattr(ParallelEnv(), "_device_id"):
            return pipeline_init(self, *args, **kwargs)
        ParallelEnv._device_id = 0
        try:
            return pipeline_init(self, *args, **kwargs)
        finally:
            del ParallelEnv._device_id

    pp_layers.PipelineLayer.__init__ = init_with_device_id

    import paddle.distributed as dist
    from paddle.distributed.fleet.meta_parallel.pp_utils import p2p_communication

    def tensors(t: Any) -> tuple:
        return t if isinstance(t, tuple) else (t,)

    def batched_p2p_ops(
        tensor_send_prev: Any,
        tensor_recv_prev: Any,
        tensor_send_next: Any,
        tensor_recv_next: Any,
        hcg: Any,
    ) -> list:
        # gloo has no calc-stream send/recv, and blocking sends deadlock when both neighbours
        # send first: even stages send before they receive, odd stages receive first, so
        # every send meets a posted receive (Paddle's own order for unbatched p2p).
        group = hcg.get_pipe_parallel_group()
        prev, nxt = hcg._get_p2p_prev_rank(), hcg._get_p2p_next_rank()

        def send(t: Any, peer: int) -> None:
            if t is not None:
                for x in tensors(t):
                    dist.send(x, dst=peer, group=group, sync_op=True)

        def recv(t: Any, peer: int) -> None:
            if t is not None:
                for x in tensors(t):
                    dist.recv(x, src=peer, group=group, sync_op=True)

        if hcg.get_stage_id() % 2 == 0:
            send(tensor_send_next, nxt)
            recv(tensor_recv_prev, prev)
            send(tensor_send_prev, prev)
            recv(tensor_recv_next, nxt)
        else:
            recv(tensor_recv_prev, prev)
            send(tensor_send_next, nxt)
            recv(tensor_recv_next, nxt)
            send(tensor_send_prev, prev)
        return []

    p2p_communication._batched_p2p_ops = batched_p2p_ops


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
    _install_pipeline_shims()
    _installed = True
    log.info(
        "cpu emulation: gloo stand-ins for c_identity, c_concat, c_split, mp_allreduce "
        "and broadcast_input_data, pipeline device id and p2p installed"
    )
