"""``parallel=auto``'s report: the decision (every candidate, ranked or dropped, and the
one chosen), its JSON (``auto_layout.json``, ``plan.json``'s ``auto``) and the table a
person reads."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ftlab.planning.candidates import BATCH, MEMORY, RULE, Candidate
from ftlab.planning.cost import Hardware

REASONS_SHOWN = 3  # distinct reasons printed per kind of drop


@dataclass
class Decision:
    """The candidates, ranked or dropped, and the one chosen (None: nothing fits)."""

    hardware: Hardware
    global_batch: int
    memory_margin: float
    candidates: list[Candidate]
    notes: list[str] = field(default_factory=list)  # what was assumed, and why

    @property
    def ranked(self) -> list[Candidate]:
        return sorted((c for c in self.candidates if c.rank is not None), key=lambda c: c.rank)

    @property
    def chosen(self) -> Candidate | None:
        ranked = self.ranked
        return ranked[0] if ranked else None

    @property
    def closest(self) -> list[Candidate]:
        """The candidates that run but do not fit, smallest shortfall first."""
        over = [c for c in self.candidates if c.kind == MEMORY and c.memory_gib is not None]
        return sorted(over, key=lambda c: (c.memory_gib - c.usable_gib, c.memory_gib))

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        closest = self.closest[:1]
        return {
            "hardware": self.hardware.to_dict(),
            "global_batch": self.global_batch,
            "memory_margin": self.memory_margin,
            "notes": self.notes,
            "chosen": dataclasses.asdict(chosen) if chosen else None,
            "chosen_label": chosen.label if chosen else None,
            "does_not_fit": None
            if chosen or not closest
            else (
                f"does not fit: needs {closest[0].memory_gib:.1f} GiB per device, "
                f"has {closest[0].usable_gib:.1f}"
            ),
            "counts": {
                "candidates": len(self.candidates),
                "ranked": len(self.ranked),
                **{
                    kind: sum(c.kind == kind for c in self.candidates)
                    for kind in (BATCH, RULE, MEMORY)
                },
            },
            "candidates": [dataclasses.asdict(c) for c in self.ranked]
            + [dataclasses.asdict(c) for c in self.candidates if c.rank is None],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        return cls(
            hardware=Hardware(**data["hardware"]),
            global_batch=data["global_batch"],
            memory_margin=data["memory_margin"],
            candidates=[Candidate(**c) for c in data["candidates"]],
            notes=list(data.get("notes", [])),
        )


def assumed_sources(hw: Hardware) -> list[str]:
    """Where the numbers not set by ``launch.*`` came from, one line per source."""
    by_source: dict[str, list[str]] = {}
    for key, source in hw.sources.items():
        if not source.startswith("launch."):
            by_source.setdefault(source, []).append(key)
    return [f"{source}: {', '.join(keys)}" for source, keys in by_source.items()]


# --------------------------------------------------------------------------- printing


def gib(x: float | None) -> str:
    return "" if x is None else f"{x:,.1f} GiB" if x >= 1 else f"{x * 1024:,.0f} MiB"


def format_decision(decision: Decision, show: int = 5) -> str:
    """The ranking a person reads: the top candidates, then why the rest were dropped."""
    hw = decision.hardware
    usable = hw.usable_gib(1, decision.memory_margin)
    lines = [
        "",
        "ftlab parallel=auto",
        f"  devices        {hw.describe()}",
        (
            f"  memory         {usable:.1f} GiB usable per device ({decision.memory_margin:.0%} "
            "margin" + (f", {hw.reserved_gib:g} GiB reserved)" if hw.reserved_gib else ")")
            if hw.device != "cpu"
            else f"  memory         {usable:.1f} GiB of RAM usable ({decision.memory_margin:.0%} "
            "margin), shared by a layout's processes"
        ),
        f"  global batch   {decision.global_batch} samples per step",
    ]
    lines += [f"  {'figures' if i == 0 else '':<14} {n}" for i, n in enumerate(decision.notes)]
    ranked = decision.ranked
    header = (
        f"  {'rank':>4}  {'layout':<30} {'micro x acc':>11}  {'recompute':<9} "
        f"{'memory':>10}  {'step s':>9}  {'tokens/s':>10}"
    )
    if ranked:
        lines += ["", header]
        for c in _best_per_layout(ranked)[:show]:
            lines.append(
                f"  {c.rank:>4}  {c.layout_label + f' ({c.world_size} dev)':<30} "
                f"{f'{c.micro_batch} x {c.accumulation}':>11}  {c.recompute:<9} "
                f"{gib(c.memory_gib):>10}  {c.step_seconds:>9.4g}  "
                f"{c.tokens_per_second:>10,.0f}"
            )
        lines.append(
            f"  (the fastest batch split and recompute of each layout; {len(ranked)} fitting "
            "candidates in auto_layout.json)"
        )
        best = ranked[0]
        lines += [
            "",
            f"  chosen         {best.label}",
            f"                 step {best.step_seconds:.4g} s = {best.step_breakdown}",
        ]
    dropped = [c for c in decision.candidates if c.kind]
    if dropped:
        lines.append("  dropped")
        for kind in (MEMORY, RULE, BATCH):
            of_kind = [c for c in dropped if c.kind == kind]
            if not of_kind:
                continue
            if kind == MEMORY:
                c = decision.closest[0]
                lines.append(
                    f"    {len(of_kind):>5} do not fit (closest: {c.layout_label}, micro "
                    f"{c.micro_batch}, recompute {c.recompute}: {c.reason})"
                )
            else:
                lines.append(f"    {len(of_kind):>5} {kind}, e.g.")
                counted = Counter(_first_sentence(c.reason) for c in of_kind)
                lines += [f"            {r}" for r, _ in counted.most_common(REASONS_SHOWN)]
    return "\n".join(lines)


def _best_per_layout(ranked: list[Candidate]) -> list[Candidate]:
    """The best-ranked candidate of each layout (micro-batch and recompute variants folded)."""
    seen: dict[tuple[str, int], Candidate] = {}
    for c in ranked:
        seen.setdefault((c.layout_label, c.world_size), c)
    return list(seen.values())


def _first_sentence(text: str) -> str:
    head = text.split(": ", 1)[-1] if text.startswith("parallel=") else text
    return head.split(". ")[0].rstrip(".")
