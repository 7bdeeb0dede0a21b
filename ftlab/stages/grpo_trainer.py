"""``GrpoTrainer``: a PaddleNLP ``Trainer`` whose training step samples, scores and trains.

One training step (``training_step``) on a batch of prompt indices:

1. **generate** (every ``num_iterations`` steps; the batch is reused in between): each
   prompt ``num_generations`` times, sampled in one batch with ftlab's generation code
   (``ftlab.evaluation.generation``, left-padded, KV cache), from Paddle's global
   generator, whose state every checkpoint saves (``ftlab.training.checkpoint_state``),
   so a resumed run samples what the uninterrupted one sampled;
2. **score**: the reward functions, their weighted sum, group-normalised advantages;
   the old policy's log-probs (only when ``num_iterations > 1``; otherwise the ratio is
   1 and the old log-probs are the current ones, detached) and the reference's (beta > 0);
3. **train**: the policy's per-token log-probs of the completions and ``grpo_loss``.

Sequences are ``prompt + completion`` right-padded: under causal attention the padding
at the end never reaches a real token, so no attention mask is needed and every
sequence's positions start at 0 as in generation.

Everything else (optimizer, schedule, checkpoints, resume, trackers) is PaddleNLP's
Trainer with ftlab's additions (``FtlabTrainerMixin``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
from paddlenlp.trainer import Trainer

from ftlab.evaluation.generation import generate_token_ids, resolve_pad_token_id
from ftlab.record.rundir import COMPLETIONS, RunDir
from ftlab.stages.grpo_data import Prompt
from ftlab.stages.grpo_loss import group_advantages, grpo_loss
from ftlab.stages.rewards import RewardSet
from ftlab.training.progress import console
from ftlab.training.trainer import FtlabTrainerMixin

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrpoSettings:
    num_generations: int
    temperature: float
    top_p: float
    max_new_tokens: int
    num_iterations: int
    beta: float
    epsilon: float
    epsilon_high: float
    loss_type: str
    scale_rewards: bool
    num_logged_groups: int


@dataclass
class GenerationBatch:
    """One batch of sampled completions with everything the loss needs."""

    input_ids: paddle.Tensor  # [N, L] prompt + completion, right-padded
    targets: paddle.Tensor  # [N, L - 1] the next token at each position
    mask: paddle.Tensor  # [N, L - 1] 1 where the target is a completion token
    advantages: paddle.Tensor  # [N]
    old_logps: paddle.Tensor | None  # [N, L - 1] (num_iterations > 1)
    ref_logps: paddle.Tensor | None  # [N, L - 1] (beta > 0)
    tokens: int  # real (non-padding) tokens in input_ids
    stats: dict[str, float]  # rewards and lengths, logged for every step that trains on it


def pad_sequences(
    prompts: list[list[int]], completions: list[list[int]], pad: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(input_ids [N, L], targets [N, L-1], mask [N, L-1])`` for prompt + completion
    sequences right-padded to the longest; ``mask`` marks the positions whose target is a
    completion token."""
    seqs = [p + c for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width - 1), dtype=np.float32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, : len(p) + len(c)] = p + c
        mask[i, len(p) - 1 : len(p) - 1 + len(c)] = 1.0
    return ids, ids[:, 1:].copy(), mask


class GrpoTrainer(FtlabTrainerMixin, Trainer):
    """GRPO on PaddleNLP's Trainer (module docstring)."""

    def __init__(
        self,
        *args: Any,
        settings: GrpoSettings,
        rewards: RewardSet,
        reference_model: Any,
        switch_adapter: Callable[[Any, bool], None] | None,
        run_dir: RunDir,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.grpo = settings
        self.rewards = rewards
        self.reference_model = reference_model
        self.switch_adapter = switch_adapter
        self.run_dir = run_dir
        self.pad_id = resolve_pad_token_id(self.tokenizer, None)
        self.eos_id = int(self.tokenizer.eos_token_id)
        self._batch: GenerationBatch | None = None
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._gen_tokens = self._train_tokens = 0
        self._gen_seconds = self._train_seconds = 0.0
        self._completions_checked = False
        # The policy before training, on the dev prompts: the summary's "base" reward.
        self.base_dev = self.dev_rewards(self.model) if self.eval_dataset is not None else None

    # ------------------------------------------------------------------ one step

    def training_step(self, model: Any, inputs: dict, *args: Any, **kwargs: Any) -> Any:
        step = self.state.global_step + 1
        if not self._completions_checked:
            self._drop_completions_after(self.state.global_step)
        k = self.grpo.num_iterations
        if self._batch is None or k == 1 or self.state.global_step % k == 0:
            index = inputs["prompt_index"]
            index = index.numpy() if hasattr(index, "numpy") else np.asarray(index)
            indices = [int(i) for i in index.reshape(-1)]
            self._batch = self._generate(model, indices, step)
        batch = self._batch
        for key, value in batch.stats.items():
            self._stats[key].append(value)
        start = time.perf_counter()
        model.train()
        logps, entropy = self._token_logps(model, batch.input_ids, batch.targets, grad=True)
        parts = grpo_loss(
            logps,
            batch.old_logps if batch.old_logps is not None else logps.detach(),
            batch.ref_logps,
            batch.advantages,
            batch.mask,
            loss_type=self.grpo.loss_type,
            beta=self.grpo.beta,
            epsilon=self.grpo.epsilon,
            epsilon_high=self.grpo.epsilon_high,
            max_completion_length=self.grpo.max_new_tokens,
        )
        loss = parts.loss
        if self.args.gradient_accumulation_steps > 1:
            loss = loss / self.args.gradient_accumulation_steps
        loss.backward()
        self._train_seconds += time.perf_counter() - start
        self._train_tokens += batch.tokens
        self._tokens += batch.tokens
        self._effective_tokens += batch.tokens
        n = float(batch.mask.sum().clip(min=1.0))
        self._stats["kl"].append(parts.kl)
        self._stats["clip_ratio"].append(parts.clip_ratio)
        self._stats["clip_ratio/low"].append(parts.clip_low)
        self._stats["clip_ratio/high"].append(parts.clip_high)
        self._stats["entropy"].append(float((entropy * batch.mask).sum()) / n)
        return loss.detach()

    def _generate(self, model: Any, indices: list[int], step: int) -> GenerationBatch:
        g = self.grpo
        prompts: list[Prompt] = [self.train_dataset.prompts[i] for i in indices]
        group = [p for p in prompts for _ in range(g.num_generations)]
        start = time.perf_counter()
        completions = generate_token_ids(
            model,
            self.tokenizer,
            [p.ids for p in group],
            batch_size=len(group),
            max_new_tokens=g.max_new_tokens,
            strategy="sampling",
            top_p=g.top_p,
            temperature=g.temperature,
            pad_token_id=self.pad_id,
        )
        self._gen_seconds += time.perf_counter() - start
        self._gen_tokens += sum(len(c) for c in completions)
        texts = [self._decode(c) for c in completions]
        scored = self.rewards.score(
            [p.text for p in group],
            texts,
            [p.record for p in group],
            [p.where for p in group],
            step,
        )
        advantages = group_advantages(scored.total, g.num_generations, g.scale_rewards)
        ids, targets, mask = pad_sequences([p.ids for p in group], completions, self.pad_id)
        input_ids, targets_t = paddle.to_tensor(ids), paddle.to_tensor(targets)
        old = ref = None
        if g.num_iterations > 1:
            old, _ = self._token_logps(model, input_ids, targets_t, grad=False)
        if g.beta:
            ref = self._reference_logps(model, input_ids, targets_t)
        self._write_samples(step, group, texts, completions, scored, advantages)
        return GenerationBatch(
            input_ids=input_ids,
            targets=targets_t,
            mask=paddle.to_tensor(mask),
            advantages=paddle.to_tensor(advantages.astype(np.float32)),
            old_logps=old,
            ref_logps=ref,
            tokens=int(sum(len(p.ids) + len(c) for p, c in zip(group, completions, strict=True))),
            stats=self._batch_stats(completions, scored),
        )

    def _decode(self, ids: list[int]) -> str:
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _token_logps(
        self, model: Any, input_ids: paddle.Tensor, targets: paddle.Tensor, grad: bool
    ) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Per-position log-prob of the next token and (no gradient) the entropy."""
        import paddle.nn.functional as F

        with paddle.set_grad_enabled(grad):
            out = model(input_ids=input_ids)
            logits = out.logits if hasattr(out, "logits") else out[0]
            logits = logits[:, :-1].astype("float32")
            logp_all = F.log_softmax(logits, axis=-1)
            logps = paddle.take_along_axis(logp_all, targets.unsqueeze(-1), axis=-1).squeeze(-1)
        with paddle.no_grad():
            lp = logp_all.detach()
            entropy = -(paddle.exp(lp) * lp).sum(-1)
        return logps, entropy

    def _reference_logps(
        self, model: Any, input_ids: paddle.Tensor, targets: paddle.Tensor
    ) -> paddle.Tensor:
        if self.reference_model is not None:
            logps, _ = self._token_logps(self.reference_model, input_ids, targets, grad=False)
            return logps
        if self.switch_adapter is None:
            raise RuntimeError("beta > 0 but the trainer has no reference model or switch")
        self.switch_adapter(model, False)
        try:
            logps, _ = self._token_logps(model, input_ids, targets, grad=False)
        finally:
            self.switch_adapter(model, True)
        return logps

    # ------------------------------------------------------------------ what users watch

    def _batch_stats(self, completions: list[list[int]], scored: Any) -> dict[str, float]:
        out = {"reward": float(scored.total.mean()), "reward_std": float(scored.total.std())}
        for name, values in scored.per_function.items():
            out[f"rewards/{name}"] = float(values.mean())
            out[f"rewards/{name}_std"] = float(values.std())
        lengths = [len(c) for c in completions]
        out["completion_length"] = float(np.mean(lengths))
        out["completion_length_max"] = float(max(lengths))
        out["completions_ended"] = float(np.mean([c[-1:] == [self.eos_id] for c in completions]))
        return out

    def _write_samples(
        self,
        step: int,
        group: list[Prompt],
        texts: list[str],
        completions: list[list[int]],
        scored: Any,
        advantages: np.ndarray,
    ) -> None:
        """``completions.jsonl``: the first groups of a generation batch that a logging
        step trains on (the first and last step included)."""
        every = max(self.args.logging_steps, 1)
        steps = range(step, step + self.grpo.num_iterations)
        if not any(s == 1 or s % every == 0 or s == self.state.max_steps for s in steps):
            return
        rows = group[: self.grpo.num_generations * self.grpo.num_logged_groups]
        for i, prompt in enumerate(rows):
            self.run_dir.append_jsonl(
                COMPLETIONS,
                {
                    "step": step,
                    "record": prompt.where,
                    "prompt": prompt.text,
                    "completion": texts[i],
                    "reward": float(scored.total[i]),
                    "rewards": {n: float(v[i]) for n, v in scored.per_function.items()},
                    "advantage": float(advantages[i]),
                    "tokens": len(completions[i]),
                },
            )

    def _drop_completions_after(self, step: int) -> None:
        """A resumed run logs its steps after the checkpoint again: drop the old lines."""
        self._completions_checked = True
        if step == 0 or not self.run_dir.exists(COMPLETIONS) or not self.run_dir.is_main:
            return
        rows = [r for r in self.run_dir.read_jsonl(COMPLETIONS) if r["step"] <= step]
        self.run_dir.write_jsonl(COMPLETIONS, rows)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        if "loss" in logs and self._stats:
            for key, values in self._stats.items():
                logs[key] = round(float(np.mean(values)), 6)
            if self._gen_seconds:
                logs["generation_tokens_per_second"] = round(
                    self._gen_tokens / self._gen_seconds, 2
                )
            if self._train_seconds:
                rate = self._train_tokens / self._train_seconds
                logs["training_tokens_per_second"] = round(rate, 2)
            self._stats = defaultdict(list)
            self._gen_tokens = self._train_tokens = 0
            self._gen_seconds = self._train_seconds = 0.0
        super().log(logs, **kwargs)

    # ------------------------------------------------------------------ dev reward

    def dev_rewards(self, model: Any) -> dict[str, float]:
        """Greedy completions of the dev prompts, scored: ``reward`` and each function's."""
        prompts: list[Prompt] = self.eval_dataset.prompts
        completions = generate_token_ids(
            model,
            self.tokenizer,
            [p.ids for p in prompts],
            batch_size=max(self.args.per_device_eval_batch_size, 1),
            max_new_tokens=self.grpo.max_new_tokens,
            strategy="greedy",
            pad_token_id=self.pad_id,
        )
        scored = self.rewards.score(
            [p.text for p in prompts],
            [self._decode(c) for c in completions],
            [p.record for p in prompts],
            [p.where for p in prompts],
            self.state.global_step if self.state is not None else 0,
        )
        out = {"reward": float(scored.total.mean())}
        out.update({f"rewards/{n}": float(v.mean()) for n, v in scored.per_function.items()})
        return out

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: Any = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """The dev reward of greedy completions (GRPO has no eval loss), beside the base's."""
        tuned = self.dev_rewards(self.model)
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in tuned.items()}
        if self.base_dev is not None:
            metrics.update({f"{metric_key_prefix}_{k}_base": v for k, v in self.base_dev.items()})
            console.info(
                "eval   reward %.3f on %d dev prompts (base %.3f)",
                tuned["reward"],
                len(self.eval_dataset),
                self.base_dev["reward"],
            )
        self.log(metrics)
        return metrics
