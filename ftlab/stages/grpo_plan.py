"""What GRPO adds to a run's memory: the generation KV cache and the group's logits.

Generation holds keys and values for every layer, every completion of the step
(``per_device_train_batch_size x num_generations``) and every position up to
``data.max_length``; scoring a step's completions holds their logits, log-softmax and
(for the entropy) its exponential, ``[completions, data.max_length, vocab]`` in fp32
each, for the policy (the reference's and old policy's are computed without gradient
and freed). Compute-dtype bytes for the cache, fp32 for the log-probs (the loss casts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftlab.config.schema import RunConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGIT_COPIES = 3  # logits, log-softmax, exp (entropy)


@dataclass(frozen=True)
class GrpoMemory:
    completions: int  # sequences sampled and trained per step
    kv_cache: float  # bytes
    group_activations: float  # bytes


def grpo_memory(run: RunConfig) -> GrpoMemory:
    a, s = run.model.arch, run.stage
    n = run.train.per_device_train_batch_size * s.num_generations
    length = run.data.max_length
    heads = a.num_attention_heads or 1
    kv_heads = a.num_key_value_heads or heads
    head_dim = a.head_dim or (a.hidden_size or 0) // heads
    layers = a.num_hidden_layers or 0
    cache_b = DTYPE_BYTES.get(run.precision.dtype, 4)
    kv = 2.0 * layers * n * length * kv_heads * head_dim * cache_b
    logits = float(LOGIT_COPIES * n * length * (a.vocab_size or 0) * 4)
    return GrpoMemory(completions=n, kv_cache=kv, group_activations=logits)
