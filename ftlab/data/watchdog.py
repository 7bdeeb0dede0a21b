"""A guard for loops over data that must make progress (packing, streaming, mixtures).

Such a loop that stops making progress (a packer that returns an empty pack, a stream
whose every pass yields nothing) would otherwise spin at 100% CPU forever with no message.
Each round reports whether it made progress; after ``limit`` rounds in a row without, the
guard raises a ``DataError`` saying what the loop was doing, so a future bug is an error
that names its place, never a hang.
"""

from __future__ import annotations

from ftlab.errors import DataError


class NoProgressError(DataError):
    """A loop over data made no progress for its allowed number of rounds."""


class ProgressGuard:
    """Counts consecutive rounds without progress; raises after ``limit`` of them."""

    def __init__(self, what: str, limit: int = 1) -> None:
        if limit < 1:
            raise ValueError(f"a progress guard needs a limit of at least one round, not {limit}")
        self.what = what
        self.limit = limit
        self.stalled = 0

    def round(self, progressed: bool, detail: str = "") -> None:
        """Record one round; raise once ``limit`` rounds in a row made no progress."""
        if progressed:
            self.stalled = 0
            return
        self.stalled += 1
        if self.stalled >= self.limit:
            rounds = "a round" if self.limit == 1 else f"{self.limit} rounds in a row"
            raise NoProgressError(
                f"{self.what} made no progress for {rounds}{': ' + detail if detail else ''}. "
                "This is a bug in ftlab (stopped instead of looping forever); please report it "
                "with the data settings."
            )
