"""The GRPO objective as pure functions: group-normalised advantages and the clipped loss.

Written for ftlab (PaddleNLP's wheel has no GRPO; its repository's ``llm/alignment/rl``
trains GRPO with its own PPO trainer on GPUs). The formulas follow TRL's ``GRPOTrainer``
so that settings mean the same in both:

* **advantages**: each prompt's ``G`` completions form a group; ``A_i = r_i - mean(r)``
  over the group, divided by ``std(r) + 1e-4`` (the unbiased standard deviation) when
  ``scale_rewards`` is true. Dr. GRPO (Liu et al., 2025) leaves the scaling off: it
  weights easy and hard prompts' groups alike.
* **per-token loss**: ``ratio = exp(logp - old_logp)``;
  ``-min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)``, plus
  ``beta * KL`` with the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (always
  >= 0, 0 where policy and reference agree).
* **aggregation** (``loss_type``): ``grpo`` averages each completion's tokens, then the
  completions (DeepSeekMath's GRPO: a long completion's tokens weigh less); ``bnpo``
  averages all completion tokens of the batch; ``dr_grpo`` sums them and divides by
  ``completions x max_new_tokens``, a constant (Dr. GRPO: no length bias).
* **clip ratio**: the share of completion tokens whose ratio the clip held back (ratio
  below ``1 - epsilon`` with a negative advantage, or above ``1 + epsilon_high`` with a
  positive one: the tokens whose gradient the clip removed).

Tensors are Paddle's (the loss trains); the advantages are NumPy (rewards carry no
gradient). Every shape is ``[completions, tokens]`` with a 0/1 ``mask`` of the
completion tokens; positions outside the mask are ignored whatever they hold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# The stage's schema reads LOSS_TYPES when ftlab composes a run (``ftlab --help`` too), so
# this module loads numpy and Paddle only inside the functions that compute.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
STD_EPSILON = 1e-4  # TRL's: a group whose rewards are all equal gets advantages 0, not nan


def group_advantages(rewards: np.ndarray, group_size: int, scale_rewards: bool) -> np.ndarray:
    """Each reward minus its group's mean (divided by the group's std + 1e-4 when
    ``scale_rewards``); ``rewards`` holds consecutive groups of ``group_size``."""
    import numpy as np

    r = np.asarray(rewards, dtype=np.float64)
    if group_size < 2 or r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not form groups of {group_size} (>= 2)")
    groups = r.reshape(-1, group_size)
    adv = groups - groups.mean(axis=1, keepdims=True)
    if scale_rewards:
        adv = adv / (groups.std(axis=1, ddof=1, keepdims=True) + STD_EPSILON)
    return adv.reshape(-1)


@dataclass
class LossParts:
    """The loss and what the logs report about it (plain floats, except ``loss``)."""

    loss: Any  # paddle.Tensor, scalar, with gradient
    kl: float  # mean over completions of each one's mean per-token KL (0 when beta = 0)
    clip_ratio: float  # share of completion tokens clipped
    clip_low: float  # ... of them below 1 - epsilon (negative advantage)
    clip_high: float  # ... above 1 + epsilon_high (positive advantage)


def grpo_loss(
    logps: Any,
    old_logps: Any,
    ref_logps: Any | None,
    advantages: Any,
    mask: Any,
    *,
    loss_type: str,
    beta: float,
    epsilon: float,
    epsilon_high: float,
    max_completion_length: int,
) -> LossParts:
    """The GRPO loss of one batch of completions (module docstring: the formulas).

    ``logps``: the policy's per-token log-probs (with gradient); ``old_logps``: the same
    under the policy that sampled the completions (no gradient); ``ref_logps``: the
    reference's (None when ``beta`` is 0); ``advantages``: one per completion.
    """
    import paddle

    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: one of {', '.join(LOSS_TYPES)}")
    if beta and ref_logps is None:
        raise ValueError(f"beta={beta} needs the reference log-probs")
    mask = paddle.cast(mask, logps.dtype)
    adv = paddle.cast(advantages, logps.dtype).unsqueeze(-1)
    # Masked positions are zeroed before exp so that padding never overflows.
    ratio = paddle.exp((logps - old_logps) * mask)
    clipped = paddle.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high)
    per_token = -paddle.minimum(ratio * adv, clipped * adv)
    kl_tokens = None
    if beta:
        diff = (ref_logps - logps) * mask
        kl_tokens = paddle.exp(diff) - diff - 1.0
        per_token = per_token + beta * kl_tokens
    tokens_per_row = mask.sum(-1).clip(min=1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / tokens_per_row).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clip(min=1.0)
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (mask.shape[0] * max_completion_length)

    with paddle.no_grad():
        n = float(mask.sum().clip(min=1.0))
        low = ((ratio < 1.0 - epsilon) & (adv < 0)).astype(mask.dtype) * mask
        high = ((ratio > 1.0 + epsilon_high) & (adv > 0)).astype(mask.dtype) * mask
        kl = 0.0
        if kl_tokens is not None:
            kl = float(((kl_tokens * mask).sum(-1) / tokens_per_row).mean())
        return LossParts(
            loss=loss,
            kl=kl,
            clip_ratio=float((low + high).sum()) / n,
            clip_low=float(low.sum()) / n,
            clip_high=float(high.sum()) / n,
        )


def token_logps_and_entropy(logits: Any, targets: Any) -> tuple[Any, Any]:
    """Log-prob of each target token under ``logits`` ([N, T, V] -> [N, T]) and the
    entropy of each position's distribution ([N, T])."""
    import paddle
    import paddle.nn.functional as F

    logp_all = F.log_softmax(logits.astype("float32"), axis=-1)
    picked = paddle.take_along_axis(logp_all, targets.unsqueeze(-1), axis=-1).squeeze(-1)
    entropy = -(paddle.exp(logp_all) * logp_all).sum(-1)
    return picked, entropy
