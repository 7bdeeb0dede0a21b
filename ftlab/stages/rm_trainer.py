"""``RewardModelTrainer``: a causal LM with a scalar head, trained on preference pairs.

PaddleNLP's wheel has no reward-model trainer (its repository's ``llm/alignment/rm``
scripts build their own GPU models). Here the rows are the ones DPO reads
(``ftlab.data.preference_examples``: prompt, chosen segment, rejected segment, each
response seeing the prompt alone); a response's reward is a linear head (no bias: the
Bradley-Terry loss only sees differences) on the last layer's hidden state at the
response's last input position, which has read the prompt and the whole response but its
final token. The loss is Bradley-Terry's ``-log sigmoid(r_chosen - r_rejected)``.

The head is a trainable sublayer of the causal LM (``reward_head``), so the method's
checkpoints carry it (an adapter's trainable weights, or the whole model); the final
save also writes it alone to ``final/reward_head.safetensors``, which ``rm:RUN_DIR``
rewards read.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.trainer import Trainer

from ftlab.data.preference_examples import count_records
from ftlab.evaluation.generation import prompt_ids
from ftlab.methods.reopen import load_trained
from ftlab.record.rundir import RunDir
from ftlab.training.trainer import FtlabTrainerMixin

HEAD = "reward_head"
HEAD_FILE = "reward_head.safetensors"


def bradley_terry(chosen: Any, rejected: Any) -> tuple[Any, float, float]:
    """(mean ``-log sigmoid(chosen - rejected)``, share of pairs with chosen > rejected,
    mean margin)."""
    diff = chosen - rejected
    loss = -F.log_sigmoid(diff).mean()
    with paddle.no_grad():
        accuracy = float((diff > 0).astype("float32").mean())
        margin = float(diff.mean())
    return loss, accuracy, margin


def causal_lm(model: Any) -> Any:
    """The causal LM under a PEFT wrapper (the model itself otherwise)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, paddle.nn.Layer) and hasattr(inner, "config") else model


def attach_head(model: Any, seed: int) -> paddle.nn.Linear:
    """A zero-initialised scalar head on the causal LM: every reward starts at 0, so the
    first loss is exactly log 2."""
    lm = causal_lm(model)
    head = paddle.nn.Linear(
        lm.config.hidden_size,
        1,
        weight_attr=paddle.ParamAttr(initializer=paddle.nn.initializer.Constant(0.0)),
        bias_attr=False,
    )
    head.weight.stop_gradient = False
    lm.add_sublayer(HEAD, head)
    return head


def last_hidden(model: Any, **inputs: Any) -> paddle.Tensor:
    out = model(**inputs, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-1]


class RewardModelTrainer(FtlabTrainerMixin, Trainer):
    """Bradley-Terry training of ``reward_head`` (and the method's trainable weights)."""

    def __init__(self, *args: Any, head: paddle.nn.Linear, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head = head
        self._stats: dict[str, list[float]] = defaultdict(list)
        self._eval_stats: dict[str, list[float]] = defaultdict(list)

    def loss_units(self, inputs: dict) -> int:
        return count_records(inputs)

    def _rewards(self, model: Any, inputs: dict) -> tuple[paddle.Tensor, paddle.Tensor]:
        h = last_hidden(
            model,
            input_ids=inputs["input_ids"],
            position_ids=inputs["position_ids"],
            attention_mask=inputs["attention_mask"],
        )
        idx = inputs["response_indexs"]
        rows = idx[:, 0]
        chosen = paddle.stack([rows, idx[:, 2] - 1], axis=-1)
        rejected = paddle.stack([rows, idx[:, 3] - 1], axis=-1)
        r_chosen = self.head(paddle.gather_nd(h, chosen)).squeeze(-1)
        r_rejected = self.head(paddle.gather_nd(h, rejected)).squeeze(-1)
        return r_chosen, r_rejected

    def compute_loss(self, model: Any, inputs: dict, return_outputs: bool = False) -> Any:
        r_chosen, r_rejected = self._rewards(model, inputs)
        loss, accuracy, margin = bradley_terry(r_chosen, r_rejected)
        stats = self._stats if model.training else self._eval_stats
        stats["rewards/accuracies"].append(accuracy)
        stats["rewards/margins"].append(margin)
        stats["rewards/chosen"].append(float(r_chosen.mean()))
        stats["rewards/rejected"].append(float(r_rejected.mean()))
        return (loss, None) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict, prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[Any, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        with paddle.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        self._eval_stats = defaultdict(list)
        metrics = super().evaluate(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        extra = {f"{prefix}_{k}": float(np.mean(v)) for k, v in self._eval_stats.items()}
        if extra:
            self.log(extra)
        return {**metrics, **extra}

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        if "loss" in logs and self._stats:
            logs.update({k: round(float(np.mean(v)), 6) for k, v in self._stats.items()})
            self._stats = defaultdict(list)
        super().log(logs, **kwargs)

    def save_model(self, output_dir: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().save_model(output_dir, *args, **kwargs)
        if output_dir is not None and self.args.process_index <= 0:
            from safetensors.numpy import save_file

            weight = self.head.weight.numpy().astype(np.float32)
            save_file({"weight": weight}, str(Path(output_dir) / HEAD_FILE))


def load_head(final_dir: Path) -> paddle.nn.Linear:
    from safetensors.numpy import load_file

    weight = load_file(str(Path(final_dir) / HEAD_FILE))["weight"]
    head = paddle.nn.Linear(weight.shape[0], 1, bias_attr=False)
    head.weight.set_value(paddle.to_tensor(weight))
    return head


class RewardModelScorer:
    """A finished ``stage=rm`` run as a GRPO reward function (``rm:RUN_DIR``).

    Each completion is scored as ``[bos] + prompt + completion + [eos]`` with no chat
    template (as the demo's plain records are rendered): the head on the hidden state of
    the last input position, as in training.
    """

    def __init__(self, run_dir: Path | str, batch_size: int = 32) -> None:

        self.model, self.tokenizer = load_trained(run_dir)
        self.model.eval()
        self.head = load_head(RunDir(run_dir).final)
        self.batch_size = batch_size

    def __call__(
        self, prompts: list[str], completions: list[str], records: list[dict[str, Any]]
    ) -> list[float]:

        tok = self.tokenizer
        seqs = [
            prompt_ids(tok, p) + tok(c, add_special_tokens=False)["input_ids"]
            for p, c in zip(prompts, completions, strict=True)
        ]  # + [eos], whose input position is not read: the last input is the text's end
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        out: list[float] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start : start + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = np.full((len(chunk), width), pad, dtype=np.int64)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = s
            with paddle.no_grad():
                h = last_hidden(self.model, input_ids=paddle.to_tensor(ids))
                last = paddle.to_tensor([[i, len(s) - 1] for i, s in enumerate(chunk)])
                out += self.head(paddle.gather_nd(h, last)).squeeze(-1).numpy().tolist()
        return [float(x) for x in out]
