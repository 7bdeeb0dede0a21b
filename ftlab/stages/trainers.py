"""PaddleNLP's ``DPOTrainer`` and ``KTOTrainer`` with ftlab's Trainer additions.

The losses, reference log-probs and reward metrics are PaddleNLP's (``DPOCriterion``,
``KTOCriterion``, ``log_metric``). What ftlab changes, and why:

* **The reference switch.** With ``lora=True`` PaddleNLP's trainers compute the reference
  by setting ``disable_lora`` on the layers of its own LoRA classes only; ftlab's QLoRA
  layers are not among them, so their reference would silently equal the policy. Here
  the method switches its own adapter off (``Method.set_adapter_enabled``).
* **A single process.** Both trainers wrap a frozen reference model, and at evaluation the
  trained model, with ``fleet.distributed_model``, which fails when fleet was never
  initialised (one process, CPU or GPU: ``'Fleet' object has no attribute
  '_user_defined_strategy'``). One process needs no wrapper.
* **The logged epoch.** Their ``log`` multiplies ``state.epoch`` by ``num_train_epochs`` at
  every call (3 unless set), so the logged epoch was wrong whenever ``max_steps`` sets the
  length; ftlab's runs always do.
* **KTO's KL term.** ``KTOCriterion`` clips the KL estimate at 0 (as the KTO paper's
  ``z_0 = max(0, KL)``) only when several processes gather it; one process used it
  unclipped, so the same data trained differently on one GPU and on eight. ``ClippedKTO``
  clips it always.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paddle
import paddle.distributed as dist
import paddle.nn.functional as F
from paddlenlp.trl import DPOTrainer, KTOCriterion, KTOTrainer

from ftlab.data.preference_examples import count_records
from ftlab.training.trainer import FtlabTrainerMixin


@dataclass
class PaddleDPOConfig:
    """The settings object ``DPOTrainer``/``DPOCriterion`` read (upstream's ``DPOConfig``
    lives in ``llm/alignment/dpo/dpo_argument.py``, not in the wheel)."""

    beta: float
    loss_type: str
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    pref_loss_ratio: float = 1.0
    sft_loss_ratio: float = 0.0
    dpop_lambda: float = 50.0
    ref_model_update_steps: int = -1
    reference_free: bool = False
    lora: bool = False  # the reference is the model with its adapter switched off


@dataclass
class PaddleKTOConfig:
    """The settings object ``KTOTrainer``/``KTOCriterion`` read (upstream's ``KTOConfig``)."""

    beta: float
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    lora: bool = False


class _PreferenceMixin(FtlabTrainerMixin):
    """The fixes both preference trainers need (see the module docstring)."""

    def __init__(
        self, *args: Any, switch_adapter: Callable[[Any, bool], None] | None = None, **kwargs: Any
    ) -> None:
        self._switch_adapter = switch_adapter
        super().__init__(*args, **kwargs)

    def loss_units(self, inputs: dict) -> int:
        return count_records(inputs)

    def disable_lora(self, model: Any) -> None:
        self._switch(model, False)

    def enable_lora(self, model: Any) -> None:
        self._switch(model, True)

    def _switch(self, model: Any, enabled: bool) -> None:
        if self._switch_adapter is None:
            raise RuntimeError("this trainer has no adapter switch for its reference model")
        self._switch_adapter(model, enabled)

    def _wrap_ref_model(self, model: Any) -> Any:
        if self.args.world_size <= 1:
            model.eval()
            return model
        return super()._wrap_ref_model(model)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        epoch = self.state.epoch
        if epoch is not None and "loss" in logs:
            # Undo the multiplication by num_train_epochs in PaddleNLP's log.
            self.state.epoch = epoch / self.args.num_train_epochs
        try:
            super().log(logs, **kwargs)
        finally:
            self.state.epoch = epoch


class FtlabDPOTrainer(_PreferenceMixin, DPOTrainer):
    """DPO and its variants (``PaddleDPOConfig.loss_type``)."""


class FtlabKTOTrainer(_PreferenceMixin, KTOTrainer):
    """KTO: desirable and undesirable completions against a KL baseline."""


class ClippedKTO(KTOCriterion):
    """``KTOCriterion`` whose KL estimate is clipped at 0 on one process too."""

    def kto_loss(
        self,
        policy_chosen_logps: paddle.Tensor,
        policy_rejected_logps: paddle.Tensor,
        policy_kl_logps: paddle.Tensor,
        reference_chosen_logps: paddle.Tensor,
        reference_rejected_logps: paddle.Tensor,
        reference_kl_logps: paddle.Tensor,
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        kl = (policy_kl_logps - reference_kl_logps).mean().detach()
        if dist.get_world_size() > 1:
            kl = self._nested_gather(paddle.tile(kl, repeat_times=[1, 1])).mean()
        kl = kl.clip(min=0)
        beta = self.kto_config.beta
        losses = []
        if policy_chosen_logps.shape[0] and reference_chosen_logps.shape[0]:
            chosen = 1 - F.sigmoid(beta * (policy_chosen_logps - reference_chosen_logps - kl))
            losses.append(self.kto_config.desirable_weight * chosen)
        if policy_rejected_logps.shape[0] and reference_rejected_logps.shape[0]:
            ratio = policy_rejected_logps - reference_rejected_logps
            rejected = 1 - F.sigmoid(beta * (kl - ratio))
            losses.append(self.kto_config.undesirable_weight * rejected)
        return paddle.concat(losses, 0).mean(), kl
