"""``Summary``: a finished run's figures, as printed, as ``summary.json``, as ``ftlab-runs`` lists.

One dataclass for the three: the runner fills it, ``format`` prints it, ``to_dict`` is
the file, ``from_dict`` reads a file back (fields a run did not record stay None).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Summary:
    run_dir: str = ""
    status: str = "completed"
    model: str | None = None
    method: str | None = None
    stage: str | None = None  # sft | dpo | kto (None: a run from before stages existed)
    steps: int | None = None
    parameters: dict[str, int] = field(default_factory=dict)  # total, trainable
    first_loss: float | None = None
    final_loss: float | None = None
    # Every logged interval weighed by its number of steps (also across a resume).
    train_loss_mean: float | None = None
    eval_loss: float | None = None
    eval_ppl: float | None = None
    # The base model's dev loss before training (text formats: held-out perplexity).
    eval_loss_base: float | None = None
    eval_ppl_base: float | None = None
    entity_recall_base: float | None = None
    entity_recall: float | None = None
    # BLEU-4 / ROUGE-1/2/L of the dev generations: units, records, base, finetuned.
    generation: dict[str, Any] = field(default_factory=dict)
    tokens_per_second: float | None = None  # median over logging intervals
    effective_tokens_per_second: float | None = None  # non-padding tokens
    peak_memory_mb: float | None = None
    train_seconds: float | None = None
    wall_seconds: float | None = None
    derived: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    # The stage's own metrics (DPO's rewards/accuracies, ...): "train/<key>" for the last
    # logging interval, "eval/<key>" for the dev set.
    stage_metrics: dict[str, float] = field(default_factory=dict)
    # train.metric_for_best_model: metric, value, step, checkpoint, loaded_into_final.
    best_checkpoint: dict[str, Any] = field(default_factory=dict)
    stopped_early_at: int | None = None  # train.early_stopping_patience ended the run here
    # Trackers that can be off (train.report_to=mlflow): uri, run_id, or "off": why.
    tracking: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Summary:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def get(self, key: str, default: Any = None) -> Any:
        """A field by name (None when unset), for tables that pick columns by key."""
        value = getattr(self, key, None)
        return default if value is None else value

    def format(self) -> str:
        """The summary a person reads at the end of a run."""

        def fmt(v: Any, spec: str = ".4f") -> str:
            return "n/a" if v is None else format(v, spec)

        params = self.parameters
        lines = [
            f"run dir        {self.run_dir}",
            f"loss           {fmt(self.first_loss)} -> {fmt(self.final_loss)} "
            f"(eval {fmt(self.eval_loss)}, ppl {fmt(self.eval_ppl, '.2f')})",
        ]
        if self.eval_ppl_base is not None:
            lines.append(
                f"held-out ppl   base {fmt(self.eval_ppl_base, '.2f')} -> trained "
                f"{fmt(self.eval_ppl, '.2f')} (eval loss {fmt(self.eval_loss_base)} -> "
                f"{fmt(self.eval_loss)})"
            )
        if self.entity_recall is not None or self.entity_recall_base is not None:
            lines.append(  # the demo task's metric: only where the dev records carry entities
                f"entity recall  base {fmt(self.entity_recall_base, '.3f')} -> "
                f"fine-tuned {fmt(self.entity_recall, '.3f')}"
            )
        lines += [
            *self._generation_lines(fmt),
            *self._mixture_lines(fmt),
            f"throughput     {fmt(self.tokens_per_second, '.0f')} tokens/s "
            f"({fmt(self.effective_tokens_per_second, '.0f')} non-padding)",
            f"peak memory    {fmt(self.peak_memory_mb, '.0f')} MiB",
            *self._stage_lines(),
            *self._best_lines(),
            *self._tracking_lines(),
            f"trainable      {params.get('trainable', 0):,} of {params.get('total', 0):,} params",
            f"time           train {fmt(self.train_seconds, '.1f')} s, run "
            f"{fmt(self.wall_seconds, '.1f')} s",
        ]
        return "\n".join(["", "ftlab summary", *("  " + x for x in lines)])

    def _best_lines(self) -> list[str]:
        b = self.best_checkpoint or {}
        lines = []
        if b:
            into = ", in final/" if b.get("loaded_into_final") else ""
            lines.append(f"best           step {b['step']}: {b['metric']} {b['value']:.4f}{into}")
        if self.stopped_early_at is not None:
            lines.append(f"stopped early  at step {self.stopped_early_at} (no improvement)")
        return lines

    def _tracking_lines(self) -> list[str]:
        m = (self.tracking or {}).get("mlflow")
        if not m:
            return []
        if m.get("off"):
            return [f"mlflow         off ({m['uri']}): {m['off'][:120]}"]
        return [f"mlflow         run {m.get('run_id')} in {m['uri']}"]

    def _mixture_lines(self, fmt: Any) -> list[str]:
        sources = (self.data or {}).get("sources")
        if not sources:
            return []
        parts = [
            f"{s['name']} {fmt(s['share'], '.3f')} (weight {s['weight']:.3f}, eval "
            f"{fmt(s.get('eval_loss'), '.4f')})"
            for s in sources
        ]
        return [f"mixture        {', '.join(parts)}"]

    def _generation_lines(self, fmt: Any) -> list[str]:
        g = self.generation
        if not g:
            return []
        base, tuned = g["base"], g["finetuned"]
        names = {"bleu4": "BLEU-4", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougel": "ROUGE-L"}
        scores = ", ".join(
            f"{label} {fmt(base[k], '.3f')} -> {fmt(tuned[k], '.3f')}" for k, label in names.items()
        )
        return [
            f"generation     {g['records']} dev records, {g['units']}-level, base -> fine-tuned",
            f"               {scores}",
        ]

    def _stage_lines(self) -> list[str]:
        lines = []
        for split, label in (("train", "last interval"), ("eval", "dev")):
            values = {
                k.split("/", 1)[1]: v
                for k, v in self.stage_metrics.items()
                if k.startswith(split + "/")
            }
            if values:
                body = ", ".join(f"{k} {v:.3f}" for k, v in values.items())
                lines.append(f"{(self.stage or '') + ' ' + split:<15}{body} ({label})")
        return lines
