"""``train.optim=adamw_mini`` with the update rule it is meant to have.

PaddleNLP 3.0.0b4's ``AdamWMini`` (``paddlenlp/utils/optimizer.py``) keeps a first moment
per element and one second moment per parameter tensor (the mean of the squared
gradient), as intended, but applies the *previous* step's first moment: it updates the
moment into a new tensor and then steps with the accumulator it has not yet written. Its
first step therefore changes no weight (measured: a parameter of ones stays ones after
step 1, where AdamW moves it by the learning rate), and every later step lags one
gradient behind. ``AdamWMini`` here is PaddleNLP's class with the step taken from the
updated moment; state, checkpoints and everything else are PaddleNLP's.
"""

from __future__ import annotations

from typing import Any

from paddlenlp.utils import AdamWMini as PaddleNLPAdamWMini


class AdamWMini(PaddleNLPAdamWMini):
    def adamw_python(
        self,
        param: Any,
        grad: Any,
        learning_rate: Any,
        moment1: Any,
        moment2: Any,
        beta1_pow: Any,
        beta2_pow: Any,
        master_weight: Any,
        skip_update: Any,
        beta1: float,
        beta2: float,
        epsilon: float,
        lr_ratio: float,
        coeff: float,
        with_decay: bool,
        multi_precision: bool,
    ) -> None:
        if skip_update:
            return
        lr = learning_rate * lr_ratio
        target = master_weight if multi_precision and master_weight is not None else param
        g = grad.astype(moment1.dtype)
        m = beta1 * moment1 + (1.0 - beta1) * g
        v = beta2 * moment2 + (1.0 - beta2) * (g * g).mean()
        denom = v.sqrt() / (1.0 - beta2_pow).sqrt() + epsilon
        decayed = target * (1.0 - lr * coeff) if with_decay else target
        updated = decayed - (m / denom) * (lr / (1.0 - beta1_pow))
        target[:] = updated
        if target is not param:
            param[:] = updated.astype(param.dtype)
        moment1[:] = m
        moment2[:] = v
        beta1_pow[:], beta2_pow[:] = beta1 * beta1_pow[:], beta2 * beta2_pow[:]


def use_ftlab_adamw_mini(optimizer: Any) -> Any:
    """PaddleNLP builds the optimizer inside ``Trainer.create_optimizer`` from a class it
    imports by name; ftlab's subclass changes only the update rule and adds no state, so
    the built optimizer takes ftlab's class instead of being built a second time."""
    if type(optimizer) is PaddleNLPAdamWMini:
        optimizer.__class__ = AdamWMini
    return optimizer
