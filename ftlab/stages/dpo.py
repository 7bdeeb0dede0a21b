"""``stage=dpo``: Direct Preference Optimization and its variants, on PaddleNLP's DPOTrainer.

``stage.loss_type`` is any loss the installed ``DPOCriterion`` computes: ``sigmoid`` (DPO),
``hinge``, ``ipo``, ``kto_pair``, ``sppo_hard``, ``nca_pair``, ``dpop``, ``or`` and
``simpo`` (both reference-free), plus ``orpo`` (PaddleNLP's ``run_dpo.py`` alias: ``or``
with the SFT loss on the chosen response added, ``sft_loss_ratio=1``). ``ipo``, ``or`` and
``simpo`` compare length-normalised log-probs (PaddleNLP's ``average_log_prob``); the
others sums. Settings that a loss does not use (``label_smoothing`` outside sigmoid and
simpo, ``simpo_gamma`` outside simpo, ``dpop_lambda`` outside dpop) are refused rather
than ignored; the values in force are recorded as derived values.

Reported: PaddleNLP's reward metrics, ``rewards/chosen`` and ``rewards/rejected``
(``beta * (log pi - log pi_ref)`` of each response), ``rewards/accuracies`` (share of
pairs whose chosen reward is higher) and ``rewards/margins`` (their mean difference), the
policy's ``logps/*``, the loss; for training intervals and the dev set (``eval_*``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftlab.config.choices import check_choice
from ftlab.config.schema import StageConfig
from ftlab.data.preference import PAIRWISE
from ftlab.errors import ConfigError
from ftlab.interop.preference_export import MODEL_KEYS, preference_arguments, script_notes
from ftlab.methods.catalog import get_method
from ftlab.stages.preference_stage import PreferenceStage
from ftlab.stages.registry import StagePlan, register_stage

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "kto_pair",
    "sppo_hard",
    "nca_pair",
    "dpop",
    "or",
    "orpo",
    "simpo",
)
REFERENCE_FREE_ONLY = ("or", "orpo", "simpo")  # their losses ignore a reference
REFERENCE_FREE_ALLOWED = ("sigmoid", "hinge", "ipo", *REFERENCE_FREE_ONLY)
LENGTH_NORMALISED = ("ipo", "or", "orpo", "simpo")
SIMPO_GAMMA = 0.5  # PaddleNLP's default
DPOP_LAMBDA = 50.0


@dataclass
class DpoStageConfig(StageConfig):
    name: str = "dpo"
    loss_type: str = "sigmoid"  # see LOSS_TYPES
    beta: float = 0.1  # strength of the reference: the reward is beta * log(pi / pi_ref)
    label_smoothing: float = 0.0  # sigmoid, simpo: assumed share of flipped labels (< 0.5)
    simpo_gamma: float | None = None  # simpo: target reward margin; None -> 0.5
    dpop_lambda: float | None = None  # dpop: weight of the chosen-likelihood penalty; None -> 50
    # Drop the reference model (log pi_ref = 0). None -> true for or, orpo and simpo (their
    # losses have no reference), false otherwise.
    reference_free: bool | None = None
    pref_loss_ratio: float = 1.0  # weight of the preference loss
    # Weight of the chosen answer's NLL (an SFT term). None -> 1 for orpo, else 0.
    sft_loss_ratio: float | None = None


def reference_free(cfg: DpoStageConfig) -> bool:
    if cfg.reference_free is not None:
        return cfg.reference_free
    return cfg.loss_type in REFERENCE_FREE_ONLY


@register_stage
class Dpo(PreferenceStage):
    name = "dpo"
    schema = DpoStageConfig
    data_kind = PAIRWISE
    data_formats = ("src_response", "prompt_chosen_rejected", "chosen_rejected")
    export_script = "llm/alignment/dpo/run_dpo.py"
    export_file = "run_dpo.json"
    summary_keys = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")

    def needs_reference(self, run: RunConfig) -> bool:
        return not reference_free(run.stage)

    def check(self, run: RunConfig, env: Environment) -> None:
        s = run.stage
        check_choice("stage.loss_type", s.loss_type, LOSS_TYPES)
        if s.beta <= 0:
            raise ConfigError(f"stage.beta={s.beta}: must be > 0.")
        if not 0 <= s.label_smoothing < 0.5:
            raise ConfigError(
                f"stage.label_smoothing={s.label_smoothing}: must be in [0, 0.5) (the assumed "
                "share of pairs whose labels are flipped)."
            )
        if s.label_smoothing and s.loss_type not in ("sigmoid", "simpo"):
            raise ConfigError(
                f"stage.label_smoothing={s.label_smoothing} with stage.loss_type="
                f"{s.loss_type}: only the sigmoid and simpo losses use it. Set it to 0."
            )
        if s.simpo_gamma is not None and s.loss_type != "simpo":
            raise ConfigError(
                f"stage.simpo_gamma={s.simpo_gamma} with stage.loss_type={s.loss_type}: only "
                "simpo uses it. Remove it, or use stage.loss_type=simpo."
            )
        if s.dpop_lambda is not None and s.loss_type != "dpop":
            raise ConfigError(
                f"stage.dpop_lambda={s.dpop_lambda} with stage.loss_type={s.loss_type}: only "
                "dpop uses it. Remove it, or use stage.loss_type=dpop."
            )
        if s.reference_free is False and s.loss_type in REFERENCE_FREE_ONLY:
            raise ConfigError(
                f"stage.reference_free=false with stage.loss_type={s.loss_type}: this loss "
                "has no reference term (PaddleNLP's DPOTrainer refuses a reference model for "
                "it). Leave stage.reference_free unset."
            )
        if s.reference_free and s.loss_type not in REFERENCE_FREE_ALLOWED:
            raise ConfigError(
                f"stage.reference_free=true with stage.loss_type={s.loss_type}: this loss "
                f"needs the reference model. Reference-free losses: "
                f"{', '.join(REFERENCE_FREE_ALLOWED)}."
            )
        if s.pref_loss_ratio < 0 or (s.sft_loss_ratio is not None and s.sft_loss_ratio < 0):
            raise ConfigError("stage.pref_loss_ratio and stage.sft_loss_ratio must be >= 0.")
        super().check(run, env)

    def derived(self, run: RunConfig) -> dict[str, Any]:
        return {**super().derived(run), **self._loss_settings(run.stage)}

    def _loss_settings(self, s: DpoStageConfig) -> dict[str, Any]:
        """What PaddleNLP's DPOCriterion runs (``orpo`` is ``or`` plus the SFT loss)."""
        out: dict[str, Any] = {
            "dpo_loss": "or" if s.loss_type == "orpo" else s.loss_type,
            "reference_free": reference_free(s),
            "sft_loss_ratio": s.sft_loss_ratio
            if s.sft_loss_ratio is not None
            else (1.0 if s.loss_type == "orpo" else 0.0),
            "average_log_prob": s.loss_type in LENGTH_NORMALISED,
        }
        if s.loss_type == "simpo":
            out["simpo_gamma"] = s.simpo_gamma if s.simpo_gamma is not None else SIMPO_GAMMA
        if s.loss_type == "dpop":
            out["dpop_lambda"] = s.dpop_lambda if s.dpop_lambda is not None else DPOP_LAMBDA
        return out

    def plan(self, run: RunConfig) -> StagePlan:
        plan = super().plan(run)
        s = run.stage
        plan.details.update(loss_type=s.loss_type, beta=s.beta)
        plan.lines.insert(0, f"stage          dpo, loss {s.loss_type}, beta {s.beta:g}")
        return plan

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        from ftlab.stages.trainers import FtlabDPOTrainer, PaddleDPOConfig

        s, loss = run.stage, self._loss_settings(run.stage)
        switch = self.switch_for(run, method)
        config = PaddleDPOConfig(
            beta=s.beta,
            loss_type=loss["dpo_loss"],
            label_smoothing=s.label_smoothing,
            simpo_gamma=loss.get("simpo_gamma", SIMPO_GAMMA),
            pref_loss_ratio=s.pref_loss_ratio,
            sft_loss_ratio=loss["sft_loss_ratio"],
            dpop_lambda=loss.get("dpop_lambda", DPOP_LAMBDA),
            reference_free=loss["reference_free"],
            lora=switch is not None,
        )
        # ignore_eos_token=False: both responses' log-probs sum over all of their tokens
        # (PaddleNLP's run_dpo.py sets True, which skips the rejected response's first token).
        return FtlabDPOTrainer(
            dpo_config=config,
            ref_model=reference_model,
            switch_adapter=switch,
            ignore_eos_token=False,
            **kwargs,
        )

    def export(self, run: RunConfig, args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        s, loss = run.stage, self._loss_settings(run.stage)
        check_method_expressible(run, self.export_script)
        loss_args = {
            "beta": s.beta,
            "loss_type": s.loss_type,  # run_dpo.py turns orpo into or + sft_loss_ratio 1
            "label_smoothing": s.label_smoothing,
            "simpo_gamma": loss.get("simpo_gamma", SIMPO_GAMMA),
            "dpop_lambda": loss.get("dpop_lambda", DPOP_LAMBDA),
            "pref_loss_ratio": s.pref_loss_ratio,
            "sft_loss_ratio": loss["sft_loss_ratio"],
            "reference_free": loss["reference_free"],
        }
        notes[:] = script_notes(notes, self.export_script)
        return preference_arguments(run, self.export_script, "dpo", args, loss_args, notes)


def check_method_expressible(run: RunConfig, script: str) -> None:
    """The preference scripts train a full model or LoRA (QLoRA with
    ``weight_quantize_algo``); a method that switches on anything else cannot be exported."""
    own = get_method(run.method.name).export(run, [])
    unknown = [k for k, v in own.items() if v is True and k != "lora" and k not in MODEL_KEYS]
    if unknown:
        raise ConfigError(
            f"mode=export with stage={run.stage.name} and method={run.method.name}: "
            f"{script} trains full models and LoRA (QLoRA) only; it has no "
            f"{', '.join(unknown)}. Export method=lora, qlora or full, or train with ftlab."
        )
