"""``stage=grpo``: Group Relative Policy Optimization from reward functions.

For each prompt of SFT-format data (its target text is not trained on; rewards may read
it), the policy samples ``stage.num_generations`` completions; the reward functions
(``ftlab.stages.rewards``) score them; each completion's advantage is its reward
relative to its group's (``stage.scale_rewards``); the clipped policy-ratio loss with a
KL penalty to the reference (``ftlab.stages.grpo_loss``) trains on them for
``stage.num_iterations`` optimizer steps. The reference is the policy before training:
the trained model with its adapter switched off (LoRA family, QLoRA), else a frozen
copy (full fine-tuning, PiSSA, VeRA, LoKr); none when ``stage.beta`` is 0.

PaddleNLP's wheel has no GRPO trainer (its repository's ``llm/alignment/rl/run_rl.py``
is a GPU-only PPO-family trainer with its own rollout engine and reward servers), so
ftlab trains with its own ``GrpoTrainer`` (a PaddleNLP ``Trainer``:
``ftlab.stages.grpo_trainer``), which keeps checkpoints, resume and trackers as for
the other stages.

Reported per logging step: ``reward`` (mean, ``reward_std``), ``rewards/<fn>`` and
``rewards/<fn>_std`` per function, ``kl``, ``clip_ratio``, ``entropy``,
``completion_length``, ``generation_tokens_per_second`` and
``training_tokens_per_second``; on the dev prompts (greedy): ``eval_reward`` and
``eval_reward_base`` (the policy before training).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ftlab.config.choices import check_choice
from ftlab.config.schema import StageConfig
from ftlab.data.formats import FORMATS, TEXT_FORMATS
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method
from ftlab.stages.grpo_loss import LOSS_TYPES
from ftlab.stages.grpo_plan import grpo_memory
from ftlab.stages.preference_stage import REFERENCE_LINES, refuse_unsupported_method
from ftlab.stages.registry import (
    REFERENCE_ADAPTER,
    REFERENCE_COPY,
    REFERENCE_NONE,
    Stage,
    StagePlan,
    process_count,
    register_stage,
)
from ftlab.stages.rewards import RewardContext, RewardSet, check_reward_settings, load_reward

if TYPE_CHECKING:
    from ftlab.config.environment import Environment
    from ftlab.config.schema import RunConfig

PROMPT_FORMATS = tuple(f for f in FORMATS if f not in TEXT_FORMATS)


@dataclass
class GrpoStageConfig(StageConfig):
    name: str = "grpo"
    # Reward functions: built-ins (entity_recall, exact_match, regex_match, length) or
    # module:function from the working directory (docs/rewards.md: the signature).
    rewards: list[str] = field(default_factory=lambda: ["entity_recall"])
    reward_weights: list[float] | None = None  # one per reward; null -> all 1
    length_limit: int = 48  # the length reward: words allowed before the penalty
    num_generations: int = 4  # completions sampled per prompt (the group)
    temperature: float = 1.0  # sampling temperature (> 0)
    top_p: float = 1.0  # nucleus sampling; 1 -> off
    max_new_tokens: int = 48  # completion length limit
    num_iterations: int = 1  # optimizer steps on each generation batch
    beta: float = 0.04  # KL penalty to the reference; 0 -> no reference kept
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip: ratio <= 1 + epsilon_high; null -> epsilon
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo (ftlab/stages/grpo_loss.py)
    scale_rewards: bool = True  # divide advantages by the group's reward std
    num_logged_groups: int = 1  # prompt groups written to completions.jsonl per logging step


def epsilon_high(s: GrpoStageConfig) -> float:
    return s.epsilon if s.epsilon_high is None else s.epsilon_high


def reward_context(run: RunConfig, data_format: str) -> RewardContext:
    return RewardContext(data_format=data_format, length_limit=run.stage.length_limit)


@register_stage
class Grpo(Stage):
    name = "grpo"
    schema = GrpoStageConfig
    data_formats = PROMPT_FORMATS
    export_script = "llm/alignment/rl/run_rl.py"
    export_file = "run_rl.json"
    summary_keys = (
        "reward",
        "reward_base",
        "kl",
        "clip_ratio",
        "entropy",
        "completion_length",
    )
    loss_is_likelihood = False

    # ------------------------------------------------------------------ settings

    def reference(self, run: RunConfig) -> str:
        if run.stage.beta == 0:
            return REFERENCE_NONE
        mode = get_method(run.method.name).reference_mode(run.method)
        return REFERENCE_ADAPTER if mode == "adapter" else REFERENCE_COPY

    def check(self, run: RunConfig, env: Environment) -> None:
        s, d, t = run.stage, run.data, run.train
        check_choice("stage.loss_type", s.loss_type, LOSS_TYPES)
        numbers = [
            (s.num_generations < 2, f"stage.num_generations={s.num_generations}: must be >= 2 "
             "(advantages are relative to the other completions of the same prompt; one "
             "completion has no group to compare with)"),
            (s.temperature <= 0, f"stage.temperature={s.temperature}: must be > 0 (GRPO "
             "samples; greedy decoding would give every completion of a group the same text)"),
            (not 0 < s.top_p <= 1, f"stage.top_p={s.top_p}: must be in (0, 1]"),
            (s.max_new_tokens < 1, f"stage.max_new_tokens={s.max_new_tokens}: must be >= 1"),
            (s.num_iterations < 1, f"stage.num_iterations={s.num_iterations}: must be >= 1"),
            (s.beta < 0, f"stage.beta={s.beta}: must be >= 0 (0: no KL penalty, no reference)"),
            (not 0 < s.epsilon < 1, f"stage.epsilon={s.epsilon}: must be in (0, 1)"),
            (epsilon_high(s) < s.epsilon, f"stage.epsilon_high={s.epsilon_high}: must be >= "
             f"stage.epsilon={s.epsilon}"),
            (s.length_limit < 1, f"stage.length_limit={s.length_limit}: must be >= 1"),
            (s.num_logged_groups < 0, "stage.num_logged_groups must be >= 0"),
        ]  # fmt: skip
        for bad, message in numbers:
            if bad:
                raise ConfigError(message + ".")
        weights = check_reward_settings(s.rewards, s.reward_weights)
        del weights
        ctx = reward_context(run, d.format)
        for name in s.rewards:
            load_reward(name, ctx, load=False)  # refused here, before training
        self._check_data(run)
        self._check_method_and_layout(run, env)
        if t.max_steps <= 0:
            raise ConfigError(
                "stage=grpo needs train.max_steps > 0: a step is one generation batch's "
                "update, so epochs over the prompts do not fix the run's length."
            )
        if s.num_iterations > 1 and t.gradient_accumulation_steps > 1:
            raise ConfigError(
                f"stage.num_iterations={s.num_iterations} with train."
                f"gradient_accumulation_steps={t.gradient_accumulation_steps}: a reused "
                "generation batch is one micro-batch. Raise train.per_device_train_batch_size "
                "instead of accumulating."
            )
        if s.num_iterations > 1 and t.save_steps and t.save_steps % s.num_iterations:
            raise ConfigError(
                f"train.save_steps={t.save_steps} is not a multiple of stage.num_iterations="
                f"{s.num_iterations}: a checkpoint inside a generation batch's updates could "
                "not resume to the same losses. Use a multiple."
            )

    def _check_data(self, run: RunConfig) -> None:
        d, s = run.data, run.stage
        if d.format != "auto" and d.format not in PROMPT_FORMATS:
            raise ConfigError(
                f"data.format={d.format}: stage=grpo samples completions for prompts; it reads "
                f"SFT records with a prompt ({', '.join(PROMPT_FORMATS)})."
            )
        unsupported = [
            (d.streaming, "data.streaming=true", "data.streaming=false"),
            (d.packing != "none", f"data.packing={d.packing}", "data.packing=none"),
            (bool(d.sources), "data.sources (a mixture)", "one dataset in data.path"),
            (d.pose, "data.pose=true", "data.pose=false"),
            (run.model.flash_mask, "model.flash_mask=true", "model.flash_mask=false"),
        ]
        for on, setting, instead in unsupported:
            if on:
                raise ConfigError(
                    f"{setting} with stage=grpo: GRPO reads whole prompts into memory and "
                    f"trains on sampled completions, not on packed data rows. Use {instead}."
                )
        if d.max_length <= s.max_new_tokens:
            raise ConfigError(
                f"data.max_length={d.max_length} leaves no room for a prompt before "
                f"stage.max_new_tokens={s.max_new_tokens} completion tokens. Raise "
                "data.max_length or lower stage.max_new_tokens."
            )

    def _check_method_and_layout(self, run: RunConfig, env: Environment) -> None:
        refuse_unsupported_method(run, self.name)
        p = run.parallel
        if process_count(run) > 1 or p.cpu_emulation:
            raise ConfigError(
                f"stage=grpo with parallel={p.name}: ftlab's GRPO trainer samples and scores "
                "on one process (each rank would need its own prompts and the group's "
                "rewards gathered); multi-process GRPO is not built. Use parallel=single."
            )

    def derived(self, run: RunConfig) -> dict[str, Any]:
        s = run.stage
        return {
            "reference": self.reference(run),
            "epsilon_high": epsilon_high(s),
            "reward_weights": check_reward_settings(s.rewards, s.reward_weights),
            "completions_per_step": run.train.per_device_train_batch_size * s.num_generations,
        }

    # ------------------------------------------------------------------ plan

    def plan(self, run: RunConfig) -> StagePlan:

        s = run.stage
        reference = self.reference(run)
        mem = grpo_memory(run)
        details = {
            "name": self.name,
            "reference": reference,
            "loss_type": s.loss_type,
            "beta": s.beta,
            "num_generations": s.num_generations,
            "completions_per_step": mem.completions,
            "generation_kv_cache_bytes": mem.kv_cache,
            "group_activation_bytes": mem.group_activations,
        }
        lines = [
            f"stage          grpo, {mem.completions} completions a step "
            f"({run.train.per_device_train_batch_size} prompts x {s.num_generations}), "
            f"loss {s.loss_type}, beta {s.beta:g}",
            f"reference      {REFERENCE_LINES[reference]}",
            f"generation     KV cache {mem.kv_cache / 2**20:,.1f} MiB, logits and "
            f"log-probs of the group {mem.group_activations / 2**20:,.1f} MiB (in the "
            "activations estimate's place while generating and scoring)",
        ]
        return StagePlan(
            reference=reference,
            details=details,
            lines=lines,
            extra_bytes=mem.kv_cache + mem.group_activations,
        )

    # ------------------------------------------------------------------ export

    def export(self, run: RunConfig, args: dict[str, Any], notes: list[str]) -> dict[str, Any]:
        s = run.stage
        notes.append(
            "PaddleNLP's llm/run_finetune.py has no GRPO. This file holds the model, training "
            "and sampling keys of llm/alignment/rl/run_rl.py (GPU only: it needs "
            "paddlenlp_ops); run_rl.py scores with a reward model or a reward server "
            "(reward_model_name_or_path / use_rm_server, reward_server), so ftlab's reward "
            f"functions ({', '.join(s.rewards)}) are not expressible: serve them yourself."
        )
        notes.append(
            f"stage.loss_type={s.loss_type}, stage.scale_rewards={s.scale_rewards} and the "
            "LoRA-family methods have no run_rl.py keys; its prompts are read from "
            "train_datasets (prompt_key src, response_key tgt)."
        )
        return {
            **args,
            "rl_algorithm": "grpo",
            "actor_model_name_or_path": run.model.name_or_path,
            "rollout_n": s.num_generations,
            "update_iters": s.num_iterations,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_dec_len": s.max_new_tokens,
            "max_prompt_len": run.data.max_length - s.max_new_tokens,
            "max_length": run.data.max_length,
            "kl_loss_coeff": s.beta,
            "clip_range_ratio_low": s.epsilon,
            "clip_range_ratio_high": epsilon_high(s),
            "prompt_key": "src",
            "response_key": "tgt",
        }

    # ------------------------------------------------------------------ data, trainer

    def build_data(self, run: RunConfig, tokenizer: Any) -> Any:
        from ftlab.stages.grpo_data import build_prompt_data

        return build_prompt_data(run, tokenizer)

    def make_trainer(
        self, run: RunConfig, *, reference_model: Any, method: Any, **kwargs: Any
    ) -> Any:
        from ftlab.stages.grpo_trainer import GrpoSettings, GrpoTrainer
        from ftlab.training.trainer import MetricsJsonl

        s = run.stage
        switch = method.set_adapter_enabled if self.reference(run) == REFERENCE_ADAPTER else None
        rewards = RewardSet(
            s.rewards,
            check_reward_settings(s.rewards, s.reward_weights),
            reward_context(run, kwargs["train_dataset"].data_format),
        )
        # The run dir, for completions.jsonl: the metrics callback run.py hands over holds it.
        run_dir = next(c.run_dir for c in kwargs["callbacks"] if isinstance(c, MetricsJsonl))
        settings = GrpoSettings(
            **{f.name: getattr(s, f.name) for f in dataclasses.fields(GrpoSettings)
               if f.name != "epsilon_high"},
            epsilon_high=epsilon_high(s),
        )  # fmt: skip
        return GrpoTrainer(
            settings=settings,
            rewards=rewards,
            reference_model=reference_model if self.reference(run) == REFERENCE_COPY else None,
            switch_adapter=switch,
            run_dir=run_dir,
            **kwargs,
        )
