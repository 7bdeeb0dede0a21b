"""The data settings' own rules, checked once: by validation before anything loads, and
by ``build_data`` when it is called directly (as the tests and benchmarks do)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ftlab.config.choices import check_choice
from ftlab.config.schema import DataConfig, DataSource
from ftlab.data.formats import FORMATS, TEXT_FORMATS
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
    if cfg.format not in TEXT_FORMATS and not 0 < cfg.src_length < cfg.max_length:
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
    if cfg.format in TEXT_FORMATS:
        check_text_settings(cfg, cfg.format)
    if cfg.streaming and cfg.dev_from_train is not None:
        raise DataError(
            "data.streaming=true cannot carve data.dev_from_train out of a stream "
            "read lazily; give a dev split (dev.json or data.dev_path) instead."
        )
    check_sources(cfg)


def source_name(src: DataSource) -> str:
    """A source's label: ``name``, else the last part of its path."""
    return src.name or Path(src.path.rstrip("/")).stem or src.path


def source_config(cfg: DataConfig, src: DataSource) -> DataConfig:
    """The single-dataset settings one source is read with."""
    return dataclasses.replace(
        cfg,
        name=source_name(src),
        path=src.path,
        train_path=None,
        dev_path=None,
        format=src.format,
        chat_template=cfg.chat_template if src.chat_template is None else src.chat_template,
        on_bad_record=src.on_bad_record or cfg.on_bad_record,
        packing="none",  # packs are made of the mixture, not per source
        sources=[],
    )


def check_sources(cfg: DataConfig) -> None:
    """``data.sources`` (a weighted mixture) against the single-dataset settings."""
    if not cfg.sources:
        if not cfg.path and not cfg.train_path:
            raise DataError(
                "data.path is null and data.sources is empty: set data.path to a dataset "
                "directory or file, or data.sources to a weighted mixture."
            )
        return
    single = [
        f"data.{k}={getattr(cfg, k)}" for k in ("path", "train_path", "dev_path") if getattr(cfg, k)
    ]
    if single:
        raise DataError(
            f"data.sources (a mixture of {len(cfg.sources)}) with {', '.join(single)}: a "
            "mixture reads each source's own train and dev split. Set data.path=null (or use "
            "data=mixture) and name every dataset in data.sources."
        )
    names = [source_name(s) for s in cfg.sources]
    for src, name in zip(cfg.sources, names, strict=True):
        where = f"data.sources[{name}]"
        if not src.path:
            raise DataError(f"{where}: path is empty; set it to a dataset directory or file.")
        if not (math.isfinite(src.weight) and src.weight > 0):
            raise DataError(
                f"{where}: weight={src.weight} must be a positive number (weights are "
                "normalised over the sources)."
            )
        check_choice(f"{where}.format", src.format, CHOICES["format"], DataError)
        if src.on_bad_record is not None:
            check_choice(
                f"{where}.on_bad_record", src.on_bad_record, CHOICES["on_bad_record"], DataError
            )
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(
            f"data.sources: the name(s) {', '.join(dupes)} are used by more than one source; "
            "give each source a distinct name (data.sources[i].name)."
        )


def mixture_weights(cfg: DataConfig) -> dict[str, float] | None:
    """Normalised weights by source name (None without a mixture)."""
    if not cfg.sources:
        return None
    total = sum(s.weight for s in cfg.sources)
    return {source_name(s): s.weight / total for s in cfg.sources}


def check_text_settings(cfg: DataConfig, fmt: str) -> None:
    """Settings that mean nothing for pretraining-style text (a named or detected format)."""
    if cfg.chat_template is not None:
        raise DataError(
            f"data.chat_template={cfg.chat_template} with data.format={fmt}: text records are "
            "documents, not conversations, so no chat template applies. Set "
            "data.chat_template=null (or use an instruction format)."
        )
    if cfg.overlong != "truncate":
        raise DataError(
            f"data.overlong={cfg.overlong} with data.format={fmt}: documents are cut into "
            "rows of data.max_length and nothing is truncated or dropped (the summary counts "
            "documents_split). Leave data.overlong=truncate."
        )
