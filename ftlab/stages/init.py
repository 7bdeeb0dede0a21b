"""``init_from``: start a run from a finished one (e.g. DPO from an SFT run).

``init_from`` names a run directory (its ``final/`` is used) or a saved ``final/``-like
directory (``ftlab_method.json`` names its method). The starting model is:

* a whole model (full fine-tuning): that directory itself;
* an adapter that merges (LoRA and variants, QLoRA dequantized, VeRA, LoKr): the base with
  the adapter folded in, written once to ``<run dir>/init_model/`` (safetensors, plus the
  tokenizer and ``ftlab_merged.json``) and loaded from there, so every method loads it as
  it loads any base, a resume or ``ftlab-predict`` finds it in the run dir, and the
  merge is checked (logits on a probe prompt) before anything trains on it.

Prefix tuning and ReFT adapters cannot be merged and are refused with the reason. The
starting model must have the run's base model under it (``model.name_or_path``): a run
on another base is refused, naming both. ``Derived.init_from`` and ``Derived.init_model``
record what was used; the method record of the new run's ``final/`` names the init model
as its base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method, registered_methods
from ftlab.methods.reopen import check_saved_dir, load_trained, load_with_adapter, merge_model
from ftlab.models.loading import weight_dtype
from ftlab.record.rundir import FINAL, METHOD_RECORD, RESOLVED_CONFIG, RunDir

if TYPE_CHECKING:
    from ftlab.config.schema import RunConfig

log = logging.getLogger(__name__)

INIT_MODEL = "init_model"
INIT_RECORD = "ftlab_merged.json"


@dataclass(frozen=True)
class InitSource:
    """What ``init_from`` points at, read from its records (no weights loaded)."""

    path: Path  # init_from, resolved
    saved: Path  # the saved artefact: a run's final/, or the directory given
    method: str  # the method that saved it
    base: str  # the base model it was trained on (the run's model.name_or_path)
    run_dir: Path | None  # the run directory, when init_from names one
    whole_model: bool  # the artefact is a complete model (no merge needed)


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def inspect_init(run: RunConfig) -> InitSource:
    """Check ``init_from`` against the run before anything loads; ConfigError says why not."""
    import yaml

    given = Path(str(run.init_from)).expanduser()
    if not given.exists():
        raise ConfigError(
            f"init_from={run.init_from}: {given.resolve()} does not exist. Point it at a "
            "finished run directory or at a run's final/ directory."
        )
    run_dir = given if (given / RESOLVED_CONFIG).is_file() else None
    saved = given / FINAL if run_dir is not None else given
    record = saved / METHOD_RECORD
    if not record.is_file():
        what = "the run has not finished" if run_dir is not None else "it is not a saved run"
        raise ConfigError(
            f"init_from={run.init_from}: no {record.relative_to(given.parent)} ({what}). "
            "Point it at a finished ftlab run directory or at its final/ directory."
        )
    saved_record = json.loads(record.read_text())
    method = str(saved_record.get("method"))
    if method not in registered_methods():
        raise ConfigError(f"init_from={run.init_from}: method {method!r} is not known to ftlab.")
    base = str(saved_record.get("base_model"))
    if run_dir is not None:  # the run's own base (its final/ may sit on an init model)
        body = yaml.safe_load((run_dir / RESOLVED_CONFIG).read_text()) or {}
        base = str((body.get("model") or {}).get("name_or_path", base))
    if not _same_model(base, run.model.name_or_path):
        raise ConfigError(
            f"init_from={run.init_from} was trained on {base}, but this run's "
            f"model.name_or_path is {run.model.name_or_path}. Choose the same model group "
            "(or set model.name_or_path to that base)."
        )
    cls = get_method(method)
    if not cls.saves_whole_model and cls.merge_unsupported is not None:
        raise ConfigError(
            f"init_from={run.init_from}: its {method} adapter cannot be folded into the base "
            f"to start from: {cls.merge_unsupported}. Start from a LoRA, QLoRA, VeRA, LoKr "
            "or full fine-tuning run."
        )
    # Its weights before anything loads: a pickle or a damaged file fails here, in the
    # validation, not after Paddle and the data.
    check_saved_dir(saved, run.model.allow_pickle)
    return InitSource(
        path=given.resolve(),
        saved=saved.resolve(),
        method=method,
        base=base,
        run_dir=run_dir.resolve() if run_dir is not None else None,
        whole_model=cls.saves_whole_model,
    )


def init_model_path(source: InitSource, run_dir: Path) -> Path:
    """Where the starting model is (or will be written)."""
    return source.saved if source.whole_model else Path(run_dir) / INIT_MODEL


def materialize_init(run: RunConfig, source: InitSource, run_dir: RunDir) -> Path:
    """Write the merged starting model into the run dir (main process; once per run dir)."""
    target = init_model_path(source, run_dir.path)
    if source.whole_model or (target / INIT_RECORD).is_file() or not run_dir.is_main:
        return target
    allow = run.model.allow_pickle
    if source.run_dir is not None:
        model, tokenizer = load_trained(source.run_dir, allow_pickle=allow)
    else:
        model, tokenizer = load_with_adapter(
            run.model.name_or_path,
            source.saved,
            dtype=weight_dtype(run.precision),
            pad_token=run.model.pad_token,
            allow_pickle=allow,
        )
    merged, diff = merge_model(model, tokenizer, source.method)
    staging = target.with_name(target.name + ".staging")
    staging.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    record: dict[str, Any] = {
        "init_from": str(source.path),
        "method": source.method,
        "base_model": source.base,
        "adapter": str(source.saved),
        "probe_max_abs_logit_diff": diff,
    }
    (staging / INIT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    if target.exists():  # an earlier attempt that did not finish
        import shutil

        shutil.rmtree(target)
    staging.replace(target)
    log.info("init_from %s: merged %s adapter into %s", source.path, source.method, target)
    return target
