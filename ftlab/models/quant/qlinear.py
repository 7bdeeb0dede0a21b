"""QLoRA layer on ftlab's blockwise quantization, plus model-level replace/merge/save helpers.

``QuantLoRALinear`` keeps the frozen base weight only as packed codes + scales (buffers)
and decodes it inside forward and again inside backward (a ``PyLayer``), so autograd never
keeps a dense copy: at most one layer's float weight exists at a time, which is where
the memory saving of QLoRA comes from. The LoRA factors are fp32 parameters; the matmuls
run in ``compute_dtype``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

from ftlab.models.quant.algos import DOUBLE_QUANT_BLOCK
from ftlab.models.quant.blockwise import (
    ALGOS,
    QuantizedTensor,
    as_dtype,
    dequantize,
    quantize,
    tensor_nbytes,
)

__all__ = [
    "QUANT_CONFIG_FORMAT",
    "QLoRASpec",
    "QuantLoRALinear",
    "QuantizeReport",
    "dequantize_and_merge",
    "find_target_linears",
    "load_lora_state_dict",
    "lora_state_dict",
    "quant_config",
    "quantize_model",
]

QUANT_CONFIG_FORMAT = "ftlab-blockwise-qlora"
_QUANT_CONFIG_VERSION = 1
_LORA_PARAM_NAMES = ("lora_A", "lora_B")


@dataclass
class QLoRASpec:
    """Quantization + LoRA settings shared by every replaced layer (JSON-able via to_dict)."""

    algo: str = "nf4"  # nf4 | fp4 | int8 | int4
    block_size: int = 64
    double_quant: bool = False
    double_quant_block_size: int = DOUBLE_QUANT_BLOCK
    lora_rank: int = 8
    lora_alpha: float = 16.0  # explicit: callers resolve "None -> 2 * rank" themselves
    lora_dropout: float = 0.0
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    compute_dtype: str = "float32"  # dtype of the matmuls; LoRA parameters stay fp32

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"quant_algo={self.algo!r} is not supported; choose one of {ALGOS}")
        if not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise ValueError(f"lora_rank={self.lora_rank!r} must be a positive integer")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        as_dtype(self.compute_dtype)  # raises with the accepted names

    @property
    def scaling(self) -> float:
        denom = math.sqrt(self.lora_rank) if self.rslora else self.lora_rank
        return float(self.lora_alpha) / denom

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QLoRASpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QLoRA spec keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)


class _DequantMatmul(PyLayer):
    """``x @ dequantize(qt)`` that re-decodes the weight in backward instead of saving it.

    Saving the decoded weight (what a plain ``F.linear`` on a decoded tensor would do)
    keeps every layer's dense weight alive until backward, i.e. the whole float model.
    Only the input gradient is produced: the base weight is frozen.
    """

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, qt: QuantizedTensor, dtype: paddle.dtype) -> Any:
        ctx.qt = qt
        ctx.dtype = dtype
        return paddle.matmul(x, dequantize(qt, dtype))

    @staticmethod
    def backward(ctx: Any, grad_out: paddle.Tensor) -> paddle.Tensor:
        weight = dequantize(ctx.qt, ctx.dtype)
        return paddle.matmul(grad_out, weight, transpose_y=True)


class QuantLoRALinear(nn.Layer):
    """A frozen blockwise-quantized ``nn.Linear`` plus trainable LoRA factors.

    Weight layout follows Paddle: the decoded weight is ``[in_features, out_features]`` and
    ``forward(x) = x @ W + bias + scaling * dropout(x) @ lora_A @ lora_B``. The output has
    the dtype of ``x`` so the layer is a drop-in replacement whatever ``compute_dtype`` is.
    """

    def __init__(
        self,
        qweight: QuantizedTensor,
        spec: QLoRASpec,
        bias: paddle.Tensor | None = None,
        base_dtype: str | paddle.dtype = "float32",
    ) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"QuantLoRALinear needs a 2-D weight, got shape {qweight.shape}")
        if (qweight.algo, qweight.block_size, qweight.double_quant) != (
            spec.algo,
            spec.block_size,
            spec.double_quant,
        ):
            raise ValueError(
                f"quantized weight ({qweight.algo}, block {qweight.block_size}, "
                f"double_quant={qweight.double_quant}) does not match the spec "
                f"({spec.algo}, block {spec.block_size}, double_quant={spec.double_quant})"
            )
        self.in_features, self.out_features = qweight.shape
        self.spec = spec
        self.scaling = spec.scaling
        self.compute_dtype = as_dtype(spec.compute_dtype)
        self.base_dtype = as_dtype(base_dtype)  # dtype the float base had (used by merge)
        # Buffers, not parameters: persistable (so state_dict/save carry the quantized base)
        # and invisible to optimizers.
        for name, tensor in qweight.tensors().items():
            self.register_buffer(f"quant_{name}", tensor, persistable=True)
        if bias is not None:
            self.bias = self.create_parameter(
                shape=list(bias.shape),
                dtype=bias.dtype,
                is_bias=True,
                default_initializer=nn.initializer.Assign(bias.detach()),
            )
            self.bias.stop_gradient = True
        else:
            self.bias = None
        r = spec.lora_rank
        # Same initialisation as PaddleNLP's LoRALinear: A Kaiming-uniform, B zero, so the
        # adapted layer starts equal to the quantized base.
        self.lora_A = self.create_parameter(
            shape=[self.in_features, r],
            dtype="float32",
            default_initializer=nn.initializer.KaimingUniform(
                negative_slope=math.sqrt(5), nonlinearity="leaky_relu"
            ),
        )
        self.lora_B = self.create_parameter(
            shape=[r, self.out_features],
            dtype="float32",
            default_initializer=nn.initializer.Constant(0.0),
        )
        self.lora_dropout = nn.Dropout(spec.lora_dropout) if spec.lora_dropout > 0 else None
        # True: the quantized base alone (a preference stage's reference model, as
        # PaddleNLP's LoRA layers do with the same attribute).
        self.disable_lora = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: QLoRASpec) -> QuantLoRALinear:
        """Quantize ``linear.weight`` (left untouched; drop the Linear to free it)."""
        qweight = quantize(
            linear.weight,
            spec.algo,
            spec.block_size,
            spec.double_quant,
            spec.double_quant_block_size,
        )
        return cls(qweight, spec, bias=linear.bias, base_dtype=linear.weight.dtype)

    @property
    def quantized_weight(self) -> QuantizedTensor:
        """A view of the buffers as a QuantizedTensor (reflects loaded state dicts)."""
        names = (
            ("qabsmax", "absmax_scale", "absmax_offset") if self.spec.double_quant else ("absmax",)
        )
        return QuantizedTensor(
            codes=self.quant_codes,
            shape=(self.in_features, self.out_features),
            algo=self.spec.algo,
            block_size=self.spec.block_size,
            double_quant_block_size=self.spec.double_quant_block_size,
            **{n: getattr(self, f"quant_{n}") for n in names},
        )

    def dequantized_weight(self, dtype: str | paddle.dtype = "float32") -> paddle.Tensor:
        """The decoded base weight ``[in_features, out_features]`` (no gradient)."""
        return dequantize(self.quantized_weight, dtype)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        cdt = self.compute_dtype
        if cdt != paddle.float32 and x.place.is_cpu_place():
            # Paddle's CPU build has no bf16/fp16 matmul kernel; say so instead of a kernel
            # lookup error from deep inside the PyLayer.
            raise RuntimeError(
                f"compute_dtype={self.spec.compute_dtype} needs a GPU (Paddle has no CPU "
                "bf16/fp16 matmul); use compute_dtype=float32 on CPU"
            )
        xc = x if x.dtype == cdt else x.astype(cdt)
        out = _DequantMatmul.apply(xc, self.quantized_weight, cdt)
        if self.bias is not None:
            out = out + (self.bias if self.bias.dtype == cdt else self.bias.astype(cdt))
        if self.disable_lora:
            return out if out.dtype == x.dtype else out.astype(x.dtype)
        h = self.lora_dropout(xc) if self.lora_dropout is not None else xc
        a = self.lora_A if cdt == paddle.float32 else self.lora_A.astype(cdt)
        b = self.lora_B if cdt == paddle.float32 else self.lora_B.astype(cdt)
        out = out + paddle.matmul(paddle.matmul(h, a), b) * self.scaling
        return out if out.dtype == x.dtype else out.astype(x.dtype)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, algo={s.algo}, "
            f"block_size={s.block_size}, double_quant={s.double_quant}, r={s.lora_rank}, "
            f"scaling={self.scaling:g}, compute_dtype={s.compute_dtype}"
        )


# --------------------------------------------------------------------------- model level


@dataclass
class QuantizeReport:
    """What quantize_model / quantize_while_loading did; all byte counts are tensor bytes."""

    layers_replaced: int = 0
    replaced: list[str] = field(default_factory=list)
    base_bytes_before: int = 0  # dense weights of the replaced layers, in their dtype
    base_bytes_after: int = 0  # codes + scales of the same weights
    other_frozen_bytes: int = 0  # frozen params not quantized (embeddings, norms, biases, ...)
    trainable_params: int = 0  # LoRA parameters left trainable

    @property
    def base_ratio(self) -> float:
        return self.base_bytes_after / self.base_bytes_before if self.base_bytes_before else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["base_ratio"] = self.base_ratio
        return d


def _plain_linear(layer: nn.Layer) -> bool:
    """``nn.Linear``, or a PaddleNLP subclass that computes exactly what it does: its
    ``linear_utils.Linear`` and DeepSeek's fp8-capable ``Linear`` while the weight is not
    8-bit (both named ``Linear``; adapter layers such as ``LoRALinear`` are not)."""
    if type(layer) is nn.Linear:
        return True
    return (
        isinstance(layer, nn.Linear)
        and type(layer).__name__ == "Linear"
        and type(layer).__module__.startswith("paddlenlp.transformers")
        and layer.weight.element_size() > 1
    )


def find_target_linears(model: nn.Layer, target_patterns: Iterable[str]) -> list[str]:
    """Names of ``nn.Linear`` sublayers whose full name ``re.fullmatch``-es a pattern.

    Same convention as PaddleNLP LoRA ``target_modules``. A matched sublayer that is not a
    plain ``nn.Linear`` (e.g. an existing LoRA or tensor-parallel layer) is an error rather
    than being skipped, and so is a pattern list matching nothing.
    """
    patterns = [re.compile(p) for p in target_patterns]
    if not patterns:
        raise ValueError("target_modules is empty; give regexes such as ['.*q_proj', '.*v_proj']")
    names, wrong_type = [], []
    for name, layer in model.named_sublayers():
        if not any(p.fullmatch(name) for p in patterns):
            continue
        if _plain_linear(layer):
            names.append(name)
        elif not isinstance(layer, QuantLoRALinear):
            wrong_type.append(f"{name} ({type(layer).__name__})")
    if wrong_type:
        raise TypeError(
            "target_modules match sublayers that are not plain paddle.nn.Linear: "
            f"{wrong_type[:5]}; narrow the patterns (ftlab quantizes nn.Linear only)"
        )
    if not names:
        linears = [n for n, m in model.named_sublayers() if _plain_linear(m)][:8]
        raise ValueError(
            f"target_modules {[p.pattern for p in patterns]} match no nn.Linear sublayer "
            f"(patterns must match the full name); linear layers include: {linears}"
        )
    return names


def _parent_and_key(model: nn.Layer, name: str) -> tuple[nn.Layer, str]:
    parent = model
    *path, key = name.split(".")
    for part in path:
        parent = getattr(parent, part)
    return parent, key


def _replace_sublayer(model: nn.Layer, name: str, new: nn.Layer) -> None:
    parent, key = _parent_and_key(model, name)
    setattr(parent, key, new)  # Layer.__setattr__ registers it (works for LayerList too)


def _freeze_non_lora(model: nn.Layer, report: QuantizeReport) -> None:
    report.trainable_params = 0
    report.other_frozen_bytes = 0
    for name, param in model.named_parameters():
        is_lora = name.rsplit(".", 1)[-1] in _LORA_PARAM_NAMES
        param.stop_gradient = not is_lora
        if is_lora:
            report.trainable_params += int(math.prod(param.shape))
        else:
            report.other_frozen_bytes += tensor_nbytes(param)


def quantize_model(
    model: nn.Layer, target_patterns: Iterable[str], spec: QLoRASpec
) -> QuantizeReport:
    """Replace matching ``nn.Linear`` layers by ``QuantLoRALinear`` in place; freeze the rest.

    Layers are replaced one at a time, so each dense weight can be freed as soon as its
    layer is swapped (if nothing else references it). The model's full float weights
    still exist at the start: to never hold them, build the model under ``paddle.LazyGuard``
    and use :func:`ftlab.models.quant.loading.quantize_while_loading`.
    """
    report = QuantizeReport()
    for name in find_target_linears(model, target_patterns):
        parent, key = _parent_and_key(model, name)
        linear = getattr(parent, key)
        report.base_bytes_before += tensor_nbytes(linear.weight)
        qlayer = QuantLoRALinear.from_linear(linear, spec)
        report.base_bytes_after += qlayer.quantized_weight.nbytes()
        setattr(parent, key, qlayer)
        del linear
        report.replaced.append(name)
    report.layers_replaced = len(report.replaced)
    _freeze_non_lora(model, report)
    return report


def _quant_layers(model: nn.Layer) -> list[tuple[str, QuantLoRALinear]]:
    return [(n, m) for n, m in model.named_sublayers() if isinstance(m, QuantLoRALinear)]


def lora_state_dict(model: nn.Layer) -> dict[str, paddle.Tensor]:
    """The adapter only: ``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}`` for every layer."""
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("model has no QuantLoRALinear layers; run quantize_model first")
    return {f"{n}.{p}": getattr(m, p) for n, m in layers for p in _LORA_PARAM_NAMES}


def load_lora_state_dict(model: nn.Layer, state: dict[str, Any]) -> None:
    """Load an adapter saved by :func:`lora_state_dict`; key sets and shapes must match."""
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"adapter does not fit the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}); were target_modules the same?"
        )
    for key, param in expected.items():
        value = state[key]
        if list(value.shape) != list(param.shape):
            raise ValueError(
                f"adapter tensor {key} has shape {list(value.shape)}, model expects "
                f"{list(param.shape)}; was lora_rank the same?"
            )
        param.set_value(value)


def quant_config(model: nn.Layer) -> dict[str, Any]:
    """JSON-able description of the quantization (for ``quant_config.json``)."""
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("model has no QuantLoRALinear layers; run quantize_model first")
    specs = {tuple(sorted(m.spec.to_dict().items())) for _, m in layers}
    if len(specs) != 1:
        raise ValueError("QuantLoRALinear layers use different specs; one config cannot hold them")
    return {
        "format": QUANT_CONFIG_FORMAT,
        "version": _QUANT_CONFIG_VERSION,
        **layers[0][1].spec.to_dict(),
        "quantized_layers": [n for n, _ in layers],
    }


@contextlib.contextmanager
def _default_dtype(dtype: paddle.dtype) -> Iterator[None]:
    old = paddle.get_default_dtype()
    paddle.set_default_dtype(dtype)
    try:
        yield
    finally:
        paddle.set_default_dtype(old)


def dequantize_and_merge(model: nn.Layer) -> None:
    """Replace every ``QuantLoRALinear`` by an ``nn.Linear`` with ``W_deq + scaling * A @ B``.

    The merged weight is computed in fp32 and stored in the dtype the base had before
    quantization. Merged parameters are frozen like the rest of the base. This exports
    the *quantized* base: the result equals the adapted model, not the original float one.
    """
    layers = _quant_layers(model)
    if not layers:
        raise ValueError("model has no QuantLoRALinear layers to merge")
    for name, q in layers:
        with paddle.no_grad():
            merged = q.dequantized_weight("float32")
            merged = merged + paddle.matmul(q.lora_A, q.lora_B) * q.scaling
            # LazyGuard: no throw-away random init of a dense weight before set_value; the
            # default dtype decides the parameter dtype of nn.Linear.
            with paddle.LazyGuard(), _default_dtype(q.base_dtype):
                linear = nn.Linear(
                    q.in_features,
                    q.out_features,
                    bias_attr=None if q.bias is not None else False,
                )
            linear.weight.set_value(merged.astype(q.base_dtype))
            if q.bias is not None:
                linear.bias.set_value(q.bias.detach())
        for p in linear.parameters():
            p.stop_gradient = True
        _replace_sublayer(model, name, linear)
        del merged
