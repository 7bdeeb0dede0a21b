"""RMSNorm and rotary embedding on CPU: PaddleNLP's functions, computed with the CPU
kernels that are fast (part of ``launch.cpu_fast_path``, with the heads-first eager
attention of ``ftlab.models.attention``).

Why: PaddleNLP's Llama / Qwen2 / Qwen2-MoE layers are written for GPUs, where each of
these is a fused kernel (``use_fused_rms_norm``, ``use_fused_rope``: GPU extensions, absent
from the CPU build); their eager fallbacks hit Paddle's slowest CPU kernels. Measured at
the default run's shapes (batch 16 x 137 tokens, hidden 64, 8 heads of 8), one thread,
forward + backward, minimum of 20:

- RMSNorm ``h.pow(2)``: Paddle's CPU ``pow`` runs the generic power function, ~250x the
  time of ``paddle.square`` on the same tensor; ``rsqrt(var) * h`` broadcasts ``[B, L, 1]``
  over the last axis, ~20x slower than the same product after ``expand``. 7.5 -> 1.0 ms
  per norm (11 per step). ``square`` is exact where ``pow`` is not: outputs differ from
  PaddleNLP's by ~1 ulp (9.5e-7 at values of ~3).
- Rotary ``rotate_half`` slices the head dimension in two and concatenates (two slices, a
  negation, a concat and their gradients), and ``q * cos`` broadcasts ``[B, L, 1, D]``
  over the heads. Here ``rotate_half(x) = x @ R`` with ``R`` the signed permutation (each
  output is one ``+-x`` plus zeros, so it is exact) and ``cos`` / ``sin`` are expanded
  before the products: 15 -> 1.6 ms per layer, outputs and gradients bitwise equal.

Only the plain case is taken (float32 tensors on CPU, eager mode, no autocast, no fused
kernel asked for, position ids given), and only in models ftlab loaded
(``install_cpu_layers``, called by ``ftlab.models.loading.finish_model``): a PaddleNLP
model built elsewhere in the same process keeps PaddleNLP's functions. The replacements
sit on PaddleNLP's classes and modules (the attention layers call
``apply_rotary_pos_emb`` as a module global) and decide per call: a norm by a mark on the
layer, the rotary function by whether one of those models' attention layers is running.

What it costs: the expanded factors are kept for backward. Measured with Paddle's
allocator (fp32, Llama): per layer and token 3.75 h + 2 kv more elements than PaddleNLP's
layers (h = 64, kv = 32: 304 on 5,487, +12% with two layers), and h for the final norm;
the plan counts 4 h + 2 kv (``ftlab.planning.plan``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The families whose RMSNorm and rotary functions are exactly PaddleNLP's Llama ones
# (read in paddlenlp 3.0.0b4): family -> its RMSNorm class; and the same by module.
FAST_FAMILIES = {
    "llama": "LlamaRMSNorm",
    "qwen2": "Qwen2RMSNorm",
    "qwen2_moe": "Qwen2MoeRMSNorm",
}
FAST_MODULES = {f"paddlenlp.transformers.{f}.modeling": n for f, n in FAST_FAMILIES.items()}
# Activation elements the replacements keep beyond PaddleNLP's, per layer and token, in
# units of (hidden size, key/value width), and for the final norm (see the docstring).
EXTRA_PER_LAYER = (4, 2)
EXTRA_OUTSIDE_H = 1
_MARK = "ftlab_fast_cpu_norm"  # on a norm of a model ftlab loaded
_GATE = "ftlab_rotary_gate"  # on an attention layer whose hooks open the rotary gate

_enabled = True
_running = 0  # attention forwards of models ftlab loaded in progress (the rotary gate)


def use_fast_cpu_layers(enabled: bool) -> None:
    """Whether CPU eager layers (attention, RMSNorm, rotary) run through ftlab's faster
    layouts in this process (the run records the choice as
    ``ftlab.config.cpu_runtime.CPU_LAYERS`` words it)."""
    global _enabled
    _enabled = enabled


def fast_cpu_layers() -> bool:
    return _enabled


def _plain_cpu(tensor: Any) -> bool:
    """Float32 on CPU in eager mode, no autocast (which would run the matmul here in low
    precision where PaddleNLP's function has none)."""
    import paddle
    from paddle.amp.auto_cast import amp_state

    return (
        _enabled
        and paddle.in_dynamic_mode()
        and tensor.dtype == paddle.float32
        and bool(tensor.place.is_cpu_place())
        and not (amp_state() or {}).get("enable", False)
    )


def _rms_norm(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, hidden_states: Any) -> Any:
        if (
            not getattr(self, _MARK, False)
            or self.config.use_fused_rms_norm
            or self.weight.dtype != hidden_states.dtype
            or not _plain_cpu(hidden_states)
        ):
            return original(self, hidden_states)
        import paddle

        variance = paddle.square(hidden_states).mean(-1, keepdim=True)
        scale = paddle.rsqrt(variance + self.variance_epsilon).expand(hidden_states.shape)
        return scale * hidden_states * self.weight

    return forward


@functools.cache
def _rotate_half_matrix(dim: int) -> Any:
    """``R`` with ``x @ R == concat([-x2, x1])`` for ``x = concat([x1, x2])`` (float32)."""
    import numpy as np
    import paddle

    half = dim // 2
    matrix = np.zeros((dim, dim), dtype="float32")
    matrix[np.arange(half) + half, np.arange(half)] = -1.0
    matrix[np.arange(half), np.arange(half) + half] = 1.0
    return paddle.to_tensor(matrix)


def _rotary(original: Callable[..., Any]) -> Callable[..., Any]:
    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, position_ids: Any) -> Any:
        if not _running or position_ids is None or q.shape[-1] % 2 or not _plain_cpu(q):
            return original(q, k, cos, sin, position_ids)
        import paddle

        cos = cos.squeeze(axis=[0, 2])[position_ids].unsqueeze(2)  # [B, L, 1, D]
        sin = sin.squeeze(axis=[0, 2])[position_ids].unsqueeze(2)
        rotate = _rotate_half_matrix(q.shape[-1])

        def embed(x: Any) -> Any:
            # Same products and sum as PaddleNLP's (x * cos) + (rotate_half(x) * sin).
            return x * cos.expand(x.shape) + paddle.matmul(x, rotate) * sin.expand(x.shape)

        return embed(q), embed(k)

    return apply_rotary_pos_emb


@functools.cache
def _replace_paddlenlp_functions() -> None:
    for name, norm_class in FAST_MODULES.items():
        module = importlib.import_module(name)
        norm = getattr(module, norm_class)
        norm.forward = _rms_norm(norm.forward)
        module.apply_rotary_pos_emb = _rotary(module.apply_rotary_pos_emb)


def _enter(*_: Any) -> None:
    global _running
    _running += 1


def _leave(*_: Any) -> None:
    global _running
    _running = max(_running - 1, 0)


def install_cpu_layers(model: Any) -> int:
    """Give ``model`` the fast layouts: its norms are marked, and its attention layers open
    the rotary gate while they run (hooks on the attention layers themselves: PaddleNLP's
    LoRA wrapper calls the wrapped model's ``forward`` directly, past the model's own
    hooks); returns how many norms. Idempotent; on GPU tensors every call steps aside.

    An attention forward that raises leaves the gate open until the next one closes it;
    the rotary function is bitwise PaddleNLP's, so only memory can differ."""
    _replace_paddlenlp_functions()
    norms, attentions = [], []
    for layer in model.sublayers(include_self=True):
        module = type(layer).__module__
        if module in FAST_MODULES and type(layer).__name__ == FAST_MODULES[module]:
            norms.append(layer)
        elif module in FAST_MODULES and hasattr(layer, "attn_func"):
            attentions.append(layer)
    for norm in norms:
        object.__setattr__(norm, _MARK, True)
    for attention in attentions:
        if not getattr(attention, _GATE, False):
            attention.register_forward_pre_hook(_enter)
            attention.register_forward_post_hook(_leave)
            object.__setattr__(attention, _GATE, True)
    if norms:
        log.info("CPU layers: %d RMSNorm and %d attention layers", len(norms), len(attentions))
    return len(norms)
