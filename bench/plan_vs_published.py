"""``ftlab mode=plan device=gpu`` against published GPU memory figures (no GPU needed).

Run from the repository root: ``python bench/plan_vs_published.py`` (seconds). Prints, for
every row of ``tests/fixtures/published_memory/rows.yaml``, the plan's figure of the
published kind (per device), the published figure, their ratio and the row's band, then
the rows ftlab cannot express and why. ``tests/test_published_memory.py`` asserts the bands.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_published_memory import compare, load_table  # noqa: E402


def main() -> None:
    table = load_table()
    print("| row | plan GiB | published GiB | plan / published | band | eval pass GiB |")
    print("|---|---:|---:|---:|---|---:|")
    skipped = []
    for row in table["rows"]:
        if not row.get("expressible", True):
            skipped.append(row)
            continue
        c = compare(table, row)
        low, high = row["band"]
        flag = "" if low <= c.ratio <= high else " **out**"
        print(
            f"| {row['id']} | {c.plan_gib:.1f} | {c.published_gib:.1f} | {c.ratio:.2f}{flag} "
            f"| {low}-{high} | {c.eval_gib:.1f} |"
        )
    print("\nnot expressible:")
    for row in skipped:
        print(f"- {row['id']} ({row['figure_gib']} GiB): {row['reason']}")


if __name__ == "__main__":
    main()
