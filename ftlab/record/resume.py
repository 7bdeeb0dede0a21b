"""Resume and rerun: continue a run dir, or run its saved config again, and say what changed.

``ftlab resume=<run dir>`` re-composes the run from its ``.hydra/overrides.yaml`` (plus any
new overrides), writes into the same run dir, and continues from the newest *complete*
checkpoint. ``ftlab rerun=<run dir>`` does the same into a new run dir, from step 0.
Checkpoints are written under ``checkpoints/.staging`` and renamed into place only when
whole (``FtlabTrainer._save_checkpoint``), so a kill during a save leaves nothing that a
resume would pick up.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftlab.errors import ConfigError
from ftlab.record.rundir import (
    CHECKPOINTS,
    ENVIRONMENT,
    FINGERPRINTS,
    HYDRA,
    RESOLVED_CONFIG,
    RunDir,
)

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
# Overrides that name the invocation, not the experiment: never replayed.
_NOT_REPLAYED = ("hydra.run.dir=", "hydra.output_subdir=", "resume=", "rerun=")
# Settings of every run a resume cannot change: the checkpoint's weights belong to them.
# The method adds its own (``Method.fixed_on_resume``).
_FIXED_ON_RESUME = ("model.", "method.name", "parallel.", "stage.name", "init_from")


def fixed_on_resume(method_name: str) -> tuple[str, ...]:
    """Every setting (dotted prefix) a resume of a ``method_name`` run may not change."""
    from ftlab.methods.catalog import registered_methods

    cls = registered_methods().get(method_name)
    own = tuple(f"method.{k}" for k in cls.fixed_on_resume) if cls is not None else ()
    return (*_FIXED_ON_RESUME, *own)


def saved_overrides(run_dir: Path) -> list[str]:
    path = run_dir / HYDRA / "overrides.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not an ftlab run dir: {path} is missing.")
    return [
        o for o in OmegaConf.to_container(OmegaConf.load(path)) if not o.startswith(_NOT_REPLAYED)
    ]


def replay_argv(argv: list[str]) -> list[str]:
    """Expand ``resume=DIR`` / ``rerun=DIR`` into the saved overrides plus the new ones."""
    keys = [a for a in argv if a.startswith(("resume=", "rerun="))]
    if not keys:
        return argv
    if len(keys) > 1:
        raise ConfigError("give one of resume=<run dir> or rerun=<run dir>, once.")
    key, value = keys[0].split("=", 1)
    run_dir = Path(value).expanduser().resolve()
    new = [a for a in argv if a != keys[0]]
    replay = [*saved_overrides(run_dir), *new, f"{key}={run_dir}"]
    if key == "resume":
        # Same run dir; this invocation's Hydra files go beside the original ones.
        replay += [f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resume"]
    return replay


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = flatten(old), flatten(new)
    skip = ("resume", "rerun", "derived.")
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(skip)
    ]


def check_resume_config(run_dir: Path, new: dict[str, Any]) -> list[str]:
    """Warn about changed settings; refuse those the checkpoint cannot honour."""
    resolved = run_dir / RESOLVED_CONFIG
    if not resolved.is_file():
        raise ConfigError(f"resume={run_dir}: no {RESOLVED_CONFIG}; the run never started.")
    old = OmegaConf.to_container(OmegaConf.load(resolved))
    old.setdefault("stage", {"name": "sft"})  # runs from before stages existed were SFT
    old.setdefault("init_from", None)
    diffs = config_differences(old, new)
    fixed_keys = fixed_on_resume(str((old.get("method") or {}).get("name")))
    fixed = [d for d in diffs if d[0].startswith(fixed_keys)]
    if fixed:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in fixed)
        raise ConfigError(
            f"resume={run_dir}: these settings cannot change on resume, the checkpoint was "
            f"trained with them: {listed}. Start a new run (or rerun=) instead."
        )
    lines = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]
    for line in lines:
        log.warning("resume with a changed setting: %s", line)
    return lines


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/checkpoint-N`` (only whole ones are ever renamed there)."""
    root = run_dir / CHECKPOINTS
    staging = root / STAGING
    if staging.exists():
        log.warning("discarding %s: a save was interrupted there", staging)
        shutil.rmtree(staging)
    found = [
        (int(m.group(1)), p)
        for p in root.glob("checkpoint-*")
        if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return max(found)[1] if found else None


def reproducibility_warnings(
    source: Path, fingerprints: dict[str, str], environment: dict[str, Any]
) -> list[str]:
    """What differs from the recorded run: data fingerprints, ftlab commit, packages."""
    warnings = []
    old_prints = RunDir(source).read_json(FINGERPRINTS)
    for path in sorted(set(old_prints) | set(fingerprints)):
        if old_prints.get(path) != fingerprints.get(path):
            warnings.append(
                f"data file {path}: sha256 {old_prints.get(path)} -> {fingerprints.get(path)}"
            )
    old_env = RunDir(source).read_json(ENVIRONMENT)
    old_git, new_git = old_env.get("ftlab_git", {}), environment.get("ftlab_git", {})
    if old_git.get("commit") != new_git.get("commit") or new_git.get("dirty"):
        warnings.append(
            f"ftlab commit {old_git.get('commit')} (dirty={old_git.get('dirty')}) "
            f"-> {new_git.get('commit')} (dirty={new_git.get('dirty')})"
        )
    old_pk, new_pk = old_env.get("packages", {}), environment.get("packages", {})
    for name in sorted(set(old_pk) | set(new_pk)):
        if old_pk.get(name) != new_pk.get(name):
            warnings.append(f"package {name}: {old_pk.get(name)} -> {new_pk.get(name)}")
    return warnings
