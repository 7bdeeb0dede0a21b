"""Quantize while loading: never hold the whole float model in memory.

The model is constructed without real weights (``paddle.LazyGuard`` plus PaddleNLP's
``no_init_weights``: parameters exist as shapes only). Then, one tensor at a time, each
target linear weight is read, quantized and dropped, and every other parameter is read
straight into its lazy parameter. Peak memory is roughly the quantized model plus the
non-quantized parameters plus one dense weight, instead of the full float model.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import paddle
import paddle.nn as nn

from ftlab.models.quant.blockwise import quantize, tensor_nbytes
from ftlab.models.quant.qlinear import (
    QLoRASpec,
    QuantizeReport,
    QuantLoRALinear,
    _freeze_non_lora,
    _parent_and_key,
    find_target_linears,
)

__all__ = ["SafetensorsSource", "quantize_while_loading"]


class SafetensorsSource(Mapping[str, paddle.Tensor]):
    """Read-on-demand view of safetensors files: ``source[name]`` loads one tensor.

    ``path`` is a ``.safetensors`` file, a ``*.safetensors.index.json`` shard index, or a
    directory holding either. Files stay memory-mapped; nothing is read until asked for.
    Use as a context manager (or call :meth:`close`) to release the files.
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
        from safetensors import safe_open  # only needed here

        files = self._resolve(path)
        self._handles = [safe_open(f, framework="paddle") for f in files]
        self._where: dict[str, Any] = {}
        for handle in self._handles:
            for key in handle.keys():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in more than one safetensors shard")
                self._where[key] = handle

    @staticmethod
    def _resolve(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
        if not isinstance(path, (str, os.PathLike)):
            return [os.fspath(p) for p in path]
        path = os.fspath(path)
        if os.path.isdir(path):
            index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
            if index:
                path = index[0]
            else:
                files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
                if not files:
                    raise FileNotFoundError(f"no *.safetensors file in directory {path}")
                return files
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as fh:
                weight_map = json.load(fh)["weight_map"]
            base = os.path.dirname(path)
            return [os.path.join(base, f) for f in sorted(set(weight_map.values()))]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors file {path} does not exist")
        return [path]

    def __getitem__(self, key: str) -> paddle.Tensor:
        return self._where[key].get_tensor(key)

    def shape(self, key: str) -> list[int]:
        """Shape without reading the data."""
        return list(self._where[key].get_slice(key).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fetch(source: Mapping[str, Any], key: str, shape: Sequence[int]) -> paddle.Tensor:
    if key not in source:
        raise KeyError(
            f"checkpoint has no tensor {key!r}; the model and checkpoint disagree "
            "(different architecture, or a name prefix such as 'llama.' missing)"
        )
    value = source[key]
    if not isinstance(value, paddle.Tensor):
        value = paddle.to_tensor(value)
    got, want = list(value.shape), list(shape)
    if got != want:
        hint = ""
        if len(want) == 2 and got == want[::-1]:
            hint = (
                " (transposed: this looks like a PyTorch-layout checkpoint; convert it to "
                "PaddleNLP format first, e.g. from_pretrained(..., convert_from_torch=True) "
                "and save_pretrained)"
            )
        raise ValueError(f"tensor {key!r} has shape {got}, the model expects {want}{hint}")
    return value


def _is_initialized(param: paddle.Tensor) -> bool:
    check = getattr(param, "_is_initialized", None)
    return bool(check()) if check is not None else True


def quantize_while_loading(
    model: nn.Layer,
    source: Mapping[str, Any],
    target_patterns: Iterable[str],
    spec: QLoRASpec,
    *,
    strict: bool = True,
) -> QuantizeReport:
    """Fill a lazily built ``model`` from ``source``, quantizing target linears as read.

    ``model`` should be built as::

        with no_init_weights(True), paddle.LazyGuard():   # paddlenlp.transformers.model_utils
            model = LlamaForCausalLM(config)

    ``source`` maps parameter names (``model.state_dict()`` names, Paddle layout) to tensors
    or arrays and is read one key at a time (:class:`SafetensorsSource`, or any lazy
    mapping). Values are cast to each parameter's dtype. With ``strict`` every key of
    ``source`` must be used. Call this outside ``LazyGuard`` (the LoRA factors need a real
    initialisation). Afterwards only LoRA parameters are trainable.
    """
    report = QuantizeReport()
    used: set[str] = set()
    for name in find_target_linears(model, target_patterns):
        parent, key = _parent_and_key(model, name)
        linear = getattr(parent, key)
        wkey = f"{name}.weight"
        weight = _fetch(source, wkey, linear.weight.shape)
        qweight = quantize(
            weight, spec.algo, spec.block_size, spec.double_quant, spec.double_quant_block_size
        )
        report.base_bytes_before += tensor_nbytes(linear.weight)
        del weight  # the dense copy dies here, before the next layer is read
        bias = None
        if linear.bias is not None:
            bkey = f"{name}.bias"
            bias = _fetch(source, bkey, linear.bias.shape).astype(linear.bias.dtype)
            used.add(bkey)
        qlayer = QuantLoRALinear(qweight, spec, bias=bias, base_dtype=linear.weight.dtype)
        if not _is_initialized(qlayer.lora_A):
            raise RuntimeError(
                "quantize_while_loading ran inside paddle.LazyGuard, so the LoRA factors were "
                "not initialised; build the model under LazyGuard, then call this outside it"
            )
        setattr(parent, key, qlayer)
        del linear
        used.add(wkey)
        report.base_bytes_after += qweight.nbytes()
        report.replaced.append(name)
    report.layers_replaced = len(report.replaced)

    for name, param in model.named_parameters():
        if name in used or name.rsplit(".", 1)[-1] in ("lora_A", "lora_B"):
            continue
        value = _fetch(source, name, param.shape)
        if value.dtype != param.dtype:
            value = value.astype(param.dtype)
        param.set_value(value)
        used.add(name)
        del value

    left = sorted(set(source) - used) if strict else []
    if left:
        raise KeyError(
            f"checkpoint tensors not used by the model: {left[:5]} ({len(left)} in all); "
            "pass strict=False to ignore them"
        )
    lazy = [n for n, p in model.named_parameters() if not _is_initialized(p)]
    if lazy:
        raise RuntimeError(f"parameters left uninitialised after loading: {lazy[:5]}")
    _freeze_non_lora(model, report)
    return report
