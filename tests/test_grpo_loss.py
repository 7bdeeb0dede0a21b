"""The GRPO loss and advantages against their formulas, on hand-made numbers (1e-6)."""

from __future__ import annotations

import math

import numpy as np
import paddle
import pytest

from ftlab.stages.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss

# Two completions of 3 token slots; the second has 2 real tokens.
LOGPS = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]]
OLD = [[-1.1, -1.5, -0.5], [-0.9, -1.0, 5.0]]  # the padded slot holds garbage on purpose
REF = [[-1.2, -2.0, -0.7], [-0.4, -1.0, 3.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [0.8, -0.5]
EPS, EPS_HIGH, BETA, MAXLEN = 0.2, 0.28, 0.04, 4


def by_hand(loss_type: str, beta: float) -> tuple[float, float, float]:
    """Loss, KL and clip ratio computed one token at a time from the formulas."""
    rows, kls, clipped, n_tok = [], [], 0, 0
    for lp, old, ref, m, a in zip(LOGPS, OLD, REF, MASK, ADV, strict=True):
        toks, row_kl = [], []
        for t in range(3):
            if not m[t]:
                continue
            ratio = math.exp(lp[t] - old[t])
            clip = min(max(ratio, 1 - EPS), 1 + EPS_HIGH)
            kl = math.exp(ref[t] - lp[t]) - (ref[t] - lp[t]) - 1
            toks.append(-min(ratio * a, clip * a) + beta * kl)
            row_kl.append(kl)
            clipped += (ratio < 1 - EPS and a < 0) or (ratio > 1 + EPS_HIGH and a > 0)
            n_tok += 1
        rows.append(toks)
        kls.append(sum(row_kl) / len(row_kl))
    if loss_type == "grpo":
        loss = sum(sum(r) / len(r) for r in rows) / len(rows)
    elif loss_type == "bnpo":
        loss = sum(sum(r) for r in rows) / n_tok
    else:
        loss = sum(sum(r) for r in rows) / (len(rows) * MAXLEN)
    return loss, (sum(kls) / len(kls) if beta else 0.0), clipped / n_tok


def compute(loss_type: str, beta: float, logps=LOGPS, old=OLD, ref=REF):
    t = lambda x: paddle.to_tensor(x, dtype="float32")  # noqa: E731
    return grpo_loss(
        t(logps),
        t(old),
        t(ref) if ref is not None else None,
        t(ADV),
        t(MASK),
        loss_type=loss_type,
        beta=beta,
        epsilon=EPS,
        epsilon_high=EPS_HIGH,
        max_completion_length=MAXLEN,
    )


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, BETA])
def test_loss_kl_and_clip_ratio_equal_the_formulas(loss_type: str, beta: float) -> None:
    parts = compute(loss_type, beta, ref=REF if beta else None)
    loss, kl, clip = by_hand(loss_type, beta)
    assert float(parts.loss) == pytest.approx(loss, abs=1e-6)
    assert parts.kl == pytest.approx(kl, abs=1e-6)
    assert parts.clip_ratio == pytest.approx(clip, abs=1e-6)


def test_the_loss_types_differ_on_these_numbers() -> None:
    values = {lt: float(compute(lt, BETA).loss) for lt in LOSS_TYPES}
    assert len({round(v, 6) for v in values.values()}) == 3, values


def test_the_clip_ratio_counts_the_clipped_tokens() -> None:
    # Row 0 (A > 0): ratios e^0.1, e^-0.5, e^0 -> none above 1.28. Row 1 (A < 0): e^0.6
    # (not below 0.8), e^-0.2 = 0.819 (not below). Make row 1's first token fall below.
    parts = compute("grpo", 0.0, old=[[-1.1, -1.5, -0.5], [0.2, -1.0, 5.0]], ref=None)
    assert parts.clip_low == pytest.approx(1 / 5) and parts.clip_high == 0.0
    # A ratio above 1 + epsilon_high with a positive advantage: row 0's first token.
    parts = compute("grpo", 0.0, old=[[-1.5, -2.0, -0.5], [-0.3, -1.2, 0.0]], ref=None)
    assert parts.clip_high == pytest.approx(1 / 5) and parts.clip_low == 0.0
    assert parts.clip_ratio == pytest.approx(1 / 5)


def test_identical_policy_and_reference_give_kl_zero() -> None:
    parts = compute("bnpo", BETA, old=LOGPS, ref=LOGPS)
    assert parts.kl == 0.0 and parts.clip_ratio == 0.0
    # ratio 1 everywhere: the loss is minus the token-weighted mean advantage.
    assert float(parts.loss) == pytest.approx(-(0.8 * 3 - 0.5 * 2) / 5, abs=1e-6)


def test_beta_without_reference_logps_is_refused() -> None:
    with pytest.raises(ValueError, match="reference"):
        compute("grpo", BETA, ref=None)


def test_gradient_flows_through_the_policy_logps_only() -> None:
    logps = paddle.to_tensor(LOGPS, dtype="float32", stop_gradient=False)
    t = lambda x: paddle.to_tensor(x, dtype="float32")  # noqa: E731
    parts = grpo_loss(
        logps, logps.detach(), t(REF), t(ADV), t(MASK), loss_type="grpo", beta=BETA,
        epsilon=EPS, epsilon_high=EPS_HIGH, max_completion_length=MAXLEN,
    )  # fmt: skip
    parts.loss.backward()
    grad = logps.grad.numpy()
    assert grad[1, 2] == 0.0  # a padded slot gets no gradient
    assert np.all(grad[0] != 0.0)


def test_group_advantages_with_and_without_scaling() -> None:
    rewards = np.array([1.0, 0.0, 0.5, 0.5, 2.0, 2.0])
    unscaled = group_advantages(rewards, 2, scale_rewards=False)
    np.testing.assert_allclose(unscaled, [0.5, -0.5, 0.0, 0.0, 0.0, 0.0], atol=1e-12)
    scaled = group_advantages(rewards, 2, scale_rewards=True)
    std = math.sqrt(((1 - 0.5) ** 2 + (0 - 0.5) ** 2) / 1)  # unbiased, n - 1 = 1
    np.testing.assert_allclose(scaled[:2], [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)], atol=1e-12)
    assert np.all(scaled[2:] == 0.0)  # equal rewards: no signal, no division by zero
    g3 = group_advantages(np.array([3.0, 0.0, 0.0]), 3, scale_rewards=True)
    assert g3.sum() == pytest.approx(0.0) and g3[0] == pytest.approx(2 / (math.sqrt(3) + 1e-4))


def test_rewards_that_do_not_form_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(np.zeros(3), 2, scale_rewards=True)
    with pytest.raises(ValueError):
        group_advantages(np.zeros(4), 1, scale_rewards=True)
