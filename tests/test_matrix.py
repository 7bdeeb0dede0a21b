"""The pairwise matrix of whole runs (``tests/matrix.py``; ``make test-matrix``)."""

from __future__ import annotations

from itertools import combinations

import matrix
import pytest


def test_the_covering_array_holds_every_pair_of_values():
    rows = matrix.covering_array(matrix.AXES)
    for a, b in combinations(matrix.AXES, 2):
        seen = {(r[a], r[b]) for r in rows}
        pairs = [(x, y) for x in matrix.AXES[a] for y in matrix.AXES[b]]
        assert seen == {(x, y) for x, y in pairs if matrix.valid({a: x, b: y})}, (a, b)
    assert all(matrix.valid(r) for r in rows)
    assert rows == matrix.covering_array(matrix.AXES)  # deterministic
    # The least possible is 49: 7 methods x 5 SFT data values, and 7 methods x 2
    # preference stages (each on preference data).
    assert len(rows) <= 50


@pytest.mark.slow
def test_every_run_of_the_matrix_completes_or_is_refused_in_one_line(tmp_path):
    assert matrix.main(["--out", str(tmp_path)]) == 0
