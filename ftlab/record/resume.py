"""Resume and rerun: continue a run dir, or run its saved config again, and say what changed.

``ftlab resume=<run dir>`` re-composes the run from its ``.hydra/overrides.yaml`` (plus any
new overrides), writes into the same run dir, and continues from the newest *complete and
readable* checkpoint. ``ftlab rerun=<run dir>`` does the same into a new run dir, from
step 0. Checkpoints are written under ``checkpoints/.staging`` and renamed into place only
when whole (``FtlabTrainer._save_checkpoint``), so a kill during a save leaves nothing that
a resume would pick up; a file damaged later (a truncated copy, a bad disk) is found by
``checkpoint_problems`` before anything is loaded or written.

A finished run is never modified by a later command: ``resume=`` of a completed run says
so and stops before Hydra opens the dir (``check_resumable``), unless a larger
``train.max_steps`` asks for more training. A resume that fails before it really starts
(``training.stages`` writes the record only once the Trainer has loaded the checkpoint)
leaves the run's record as it was.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ftlab import console
from ftlab.config.overrides import given_value, override
from ftlab.errors import ConfigError, FtlabError
from ftlab.record.rundir import (
    CHECKPOINTS,
    ENVIRONMENT,
    FINGERPRINTS,
    HYDRA,
    RESOLVED_CONFIG,
    STATUS,
    SUMMARY,
    RunDir,
)
from ftlab.record.status import COMPLETED, is_running

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
# Overrides that name the invocation, not the experiment: never replayed.
_NOT_REPLAYED = ("hydra.run.dir=", "hydra.output_subdir=", "resume=", "rerun=")
# Settings of every run a resume cannot change: the checkpoint's weights (and optimizer
# state: AdamW-mini's second moments are one number per tensor) belong to them.
# The method adds its own (``Method.fixed_on_resume``).
_FIXED_ON_RESUME = ("model.", "method.name", "parallel.", "train.optim", "stage.name", "init_from")


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


class RunFinished(FtlabError):
    """``resume=`` of a run that has nothing left to do (the CLI exits 0: nothing failed)."""


def replay_argv(argv: list[str]) -> list[str]:
    """Expand ``resume=DIR`` / ``rerun=DIR`` into the saved overrides plus the new ones."""
    keys = [a for a in argv if a.startswith(("resume=", "rerun="))]
    if not keys:
        return argv
    if len(keys) > 1:
        raise ConfigError("give one of resume=<run dir> or rerun=<run dir>, once.")
    key = keys[0].split("=", 1)[0]
    value = given_value(keys, key) or keys[0].split("=", 1)[1]
    run_dir = Path(value).expanduser().resolve()
    new = [a for a in argv if a != keys[0]]
    replay = [*saved_overrides(run_dir), *new, override(key, str(run_dir))]
    if key == "resume":
        check_resumable(run_dir, new)
        # Same run dir; this invocation's Hydra files go beside the original ones.
        replay += [override("hydra.run.dir", str(run_dir)), "hydra.output_subdir=.hydra/resume"]
    return replay


def check_resumable(run_dir: Path, new: list[str]) -> None:
    """Stop a resume that must not touch the run dir, before Hydra writes into it.

    A completed run is finished: resuming it changes nothing (``RunFinished``), unless a
    ``train.max_steps`` beyond the steps it trained asks to continue. A run whose process
    is still alive on this machine is refused (two processes would write one run dir), and
    so is a run without a usable checkpoint.
    """
    record = RunDir(run_dir)
    status = record.read_json(STATUS)
    if is_running(status):
        raise ConfigError(
            f"resume={run_dir}: the run is still running (pid {status.get('pid')} on "
            f"{status.get('host')}). Wait for it to end, or stop it first."
        )
    if status.get("status") != COMPLETED:
        pick_checkpoint(run_dir)  # no usable checkpoint: say so before Hydra writes anything
        return
    done = record.read_json(SUMMARY).get("steps")
    asked = given_value(new, "train.max_steps")
    try:
        more = asked is not None and done is not None and int(asked) > int(done)
    except ValueError:
        return  # not a number: validation names the setting
    if more:
        console.warning(
            "resume=%s: the run completed %s steps; continuing to train.max_steps=%s.",
            run_dir,
            done,
            asked,
        )
        return
    raise RunFinished(
        f"resume={run_dir}: the run is finished (status completed after {done} steps, "
        "final/ written); nothing to do, and nothing in it was changed. To train it "
        f"further, add train.max_steps=N with N > {done}."
    )


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


def checkpoint_step(path: Path) -> int:
    """N of ``checkpoint-N``."""
    match = CHECKPOINT_RE.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint-N directory")
    return int(match.group(1))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/checkpoint-N``, newest first (only whole saves carry the name)."""
    root = run_dir / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/checkpoint-N`` (None when there is none)."""
    found = complete_checkpoints(run_dir)
    return found[0] if found else None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, read from its header alone (None: whole).

    The format is an 8-byte header length, a JSON header giving every tensor's byte range,
    then the data; a file shorter (or longer) than its header says is damaged. Nothing is
    deserialised beyond the JSON header.
    """
    size = path.stat().st_size
    if size < 8:
        return f"truncated: {size} bytes, not even a header"
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if 8 + length > size:
            return f"truncated: its header alone needs {8 + length} bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
            end = max(
                (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not a valid safetensors header"
    if 8 + length + end != size:
        return f"truncated: its header describes {8 + length + end} bytes, the file has {size}"
    return None


def checkpoint_problems(path: Path) -> list[str]:
    """What makes a checkpoint dir unusable, file by file (empty: whole and readable)."""
    problems: list[str] = []
    state = path / "trainer_state.json"
    try:
        json.loads(state.read_text())
    except FileNotFoundError:
        problems.append(f"{state} is missing")
    except (OSError, ValueError) as err:
        problems.append(f"{state} is not readable JSON ({err})")
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as err:
            problems.append(f"{index} is not a readable index ({err})")
            continue
        missing = [n for n in sorted(names) if not (path / n).is_file()]
        problems += [f"{path / n} is missing (named in {index.name})" for n in missing]
    for f in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            problems.append(f"{f} is damaged: {problem}")
    for f in sorted(path.glob("*.json")):
        if f.name.endswith(".index.json") or f == state:
            continue
        try:
            json.loads(f.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{f} is not readable JSON ({err})")
    for pattern in ("*.pdparams", "*.pdopt", "*.pth"):
        problems += [f"{f} is empty" for f in sorted(path.glob(pattern)) if not f.stat().st_size]
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.pdparams")):
        problems.append(f"{path} holds no model weights (*.safetensors or *.pdparams)")
    return problems


def pick_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint that is whole and readable, and warnings about newer ones.

    A damaged newer checkpoint is named with what is wrong, and the previous whole one is
    taken instead (the steps after it are trained again). Nothing is changed on disk;
    with no usable checkpoint at all this raises ``ConfigError`` naming every damage.
    """
    found = complete_checkpoints(run_dir)
    if not found:
        raise ConfigError(
            f"resume={run_dir}: no complete checkpoint under {run_dir / CHECKPOINTS}. Nothing "
            "to resume from; start the run again (rerun=) instead."
        )
    damaged: list[str] = []
    for path in found:
        problems = checkpoint_problems(path)
        if not problems:
            if damaged:
                newest = checkpoint_step(found[0])
                damaged.append(
                    f"resuming from {path.name} instead: steps {checkpoint_step(path) + 1}-"
                    f"{newest} are trained again"
                )
            return path, damaged
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        damaged.append(f"{path.name} is unusable: {problems[0]}{more}")
    raise ConfigError(
        f"resume={run_dir}: no usable checkpoint; " + "; ".join(damaged) + ". Nothing in the "
        "run dir was changed. Restore the damaged files, or start again with rerun=."
    )


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
