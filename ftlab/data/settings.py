"""The data settings' own rules, checked once: by validation before anything loads, and
by ``build_data`` when it is called directly (as the tests and benchmarks do)."""

from __future__ import annotations

from ftlab.config.choices import check_choice
from ftlab.config.schema import DataConfig
from ftlab.data.formats import FORMATS
from ftlab.data.packing import PACKING_MODES
from ftlab.data.preference import PREFERENCE_FORMATS
from ftlab.errors import DataError

CHOICES: dict[str, tuple[str, ...]] = {
    "format": ("auto", *FORMATS, *PREFERENCE_FORMATS),  # the stage says which kind it reads
    "overlong": ("truncate", "drop", "error"),
    "packing": PACKING_MODES,
    "on_bad_record": ("error", "skip"),
}


def check_data_settings(cfg: DataConfig, max_steps: int | None) -> None:
    """Raise ``DataError`` for a data setting that cannot work (``max_steps`` <= 0: none)."""
    for name, allowed in CHOICES.items():
        check_choice(f"data.{name}", getattr(cfg, name), allowed, DataError)
    if not 0 < cfg.src_length < cfg.max_length:
        raise DataError(
            f"data.src_length={cfg.src_length} must be at least 1 and below "
            f"data.max_length={cfg.max_length}, so every example keeps some target tokens."
        )
    if cfg.dev_from_train is not None and not 0 < cfg.dev_from_train < 1:
        raise DataError(
            f"data.dev_from_train={cfg.dev_from_train} must be a fraction between "
            "0 and 1 (e.g. 0.05), or null."
        )
    if cfg.streaming and (max_steps is None or max_steps <= 0):
        raise DataError(
            "data.streaming=true needs train.max_steps > 0: a stream has no known "
            "length. Set train.max_steps."
        )
    if cfg.streaming and cfg.dev_from_train is not None:
        raise DataError(
            "data.streaming=true cannot carve data.dev_from_train out of a stream "
            "read lazily; give a dev split (dev.json or data.dev_path) instead."
        )
