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
(``training.run`` writes the record only once the Trainer has loaded the checkpoint)
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
from ftlab.config.overrides import flatten, given_value, override
from ftlab.distributed.launch import inside_worker
from ftlab.errors import ConfigError, FtlabError
from ftlab.methods.catalog import registered_methods
from ftlab.models.weights import safetensors_problem
from ftlab.record.rundir import (
    CHECKPOINTS,
    ENVIRONMENT,
    FINGERPRINTS,
    HYDRA,
    RESOLVED_CONFIG,
    STATUS,
    SUMMARY,
    RunDir,
    lock_run_dir,
)
from ftlab.record.status import COMPLETED, is_running

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"
# Overrides that name the invocation, not the experiment: never replayed.
_NOT_REPLAYED = ("hydra.run.dir=", "hydra.output_subdir=", "resume=", "rerun=")
# Settings of every run a resume cannot change: the checkpoint's weights (and optimizer
# state: AdamW-mini's second moments are one number per tensor) belong to them.
# The method adds its own (``Method.fixed_on_resume``). The layout (``parallel.*``) may
# change where the checkpoint can be resharded: ``check_layout_change``.
_FIXED_ON_RESUME = ("model.", "method.name", "train.optim", "stage.name", "init_from")
# How a layout splits the checkpoint's tensors; the data-parallel degree is the resolved
# one (``derived.data_parallel_degree``: ``parallel.data`` may be left to the world size).
_SPLITS = ("tensor", "pipeline", "sharding", "sharding_stage", "expert")


def fixed_on_resume(method_name: str) -> tuple[str, ...]:
    """Every setting (dotted prefix) a resume of a ``method_name`` run may not change."""
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
    # Two resumes started together both see a run that is not running: the first to take
    # the run dir's lock owns it (a launcher's workers run under their launcher's lock).
    if run_dir.is_dir() and not inside_worker() and not lock_run_dir(run_dir):
        raise ConfigError(
            f"resume={run_dir}: another ftlab process is using this run dir (it holds its "
            "lock). Wait for it to end, or stop it first."
        )
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


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    a, b = flatten(old), flatten(new)
    skip = ("resume", "rerun", "derived.")
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(skip)
    ]


def layout(config: dict[str, Any], data_parallel_degree: int | None) -> dict[str, int]:
    """A run's parallel degrees, from its config and its resolved data-parallel degree."""
    par = config.get("parallel") or {}
    degrees = {"data": int(data_parallel_degree or par.get("data") or 1)}
    degrees.update({k: int(par.get(k) or (0 if k == "sharding_stage" else 1)) for k in _SPLITS})
    return degrees


def describe_layout(name: Any, degrees: dict[str, int]) -> str:
    world = degrees["data"] * degrees["sharding"] * degrees["tensor"] * degrees["pipeline"]
    shown = ", ".join(f"{k} {v}" for k, v in degrees.items() if v > 1 and k != "expert")
    return f"{name} ({shown or 'one process'}; {world} rank{'s' if world > 1 else ''})"


def check_layout_change(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Refuse a layout the checkpoint cannot be resharded to; describe an accepted change.

    PaddleNLP's unified checkpoint stores every tensor whole (the optimizer's moments
    under the parameter's structured name), and on load each rank takes its share,
    "dynamically" when the ranks' shares differ from the saver's: a checkpoint saved by
    data-parallel or sharded (ZeRO stage 1/2) ranks loads into any number of them. What
    it does not do here is refused before anything loads:

    * tensor/pipeline degrees: PaddleNLP 3.0.0b4 fails to load a tensor-parallel
      checkpoint into one process (``Optimizer set error, embedding_0.w_0_moment2_0
      should in state dict``, measured under the CPU emulation); other splits are not
      exercised anywhere ftlab is tested, so they are refused rather than trusted;
    * ZeRO stage 3 splits the parameters themselves, and expert parallelism places the
      experts by data-parallel rank: neither is resharded here;
    * methods PaddleNLP's unified checkpoint cannot save keep the optimizer state in
      per-rank pickles (``Method.unified_checkpoint``), which do not reshard.

    The global batch must stay (``check_global_batch``): fewer ranks take a larger
    per-device batch.
    """
    old_derived, new_derived = old.get("derived") or {}, new.get("derived") or {}
    before = layout(old, old_derived.get("data_parallel_degree"))
    after = layout(new, new_derived.get("data_parallel_degree"))
    if before == after:
        return None
    old_name = (old.get("parallel") or {}).get("name")
    new_name = (new.get("parallel") or {}).get("name")
    change = f"{describe_layout(old_name, before)} -> {describe_layout(new_name, after)}"
    head = f"resume={run_dir}: the checkpoint was trained as parallel={change}"
    for key in ("tensor", "pipeline"):
        if before[key] != after[key]:
            raise ConfigError(
                f"{head}, and parallel.{key} cannot change on resume ({before[key]} -> "
                f"{after[key]}): PaddleNLP's unified checkpoint does not reshard a "
                f"{key}-parallel split here. Keep parallel.{key}={before[key]}; the data-"
                "parallel and sharding degrees may change."
            )
    for involved, what in (
        (
            3 in (before["sharding_stage"], after["sharding_stage"]),
            "ZeRO stage 3 splits the parameters themselves",
        ),
        (
            max(before["expert"], after["expert"]) > 1,
            "the experts are placed by data-parallel rank",
        ),
    ):
        if involved:
            raise ConfigError(
                f"{head}: {what}, and such a checkpoint is not resharded on resume. "
                f"Resume with the recorded layout (parallel={old_name})."
            )
    method = str((old.get("method") or {}).get("name"))
    cls = registered_methods().get(method)
    if cls is not None and not cls.unified_checkpoint:
        raise ConfigError(
            f"{head}: method={method} cannot use PaddleNLP's unified checkpoint, so its "
            "optimizer state is saved per rank and cannot be resharded. Resume with the "
            f"recorded layout (parallel={old_name})."
        )
    return change


def check_global_batch(run_dir: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Refuse a resume whose global batch differs from the checkpoint's.

    The Trainer skips the trained steps in batches of the resumed run's size, so another
    global batch would continue at the wrong sample (and change the optimisation); with
    fewer ranks, a larger per-device batch keeps it.
    """
    old_batch = (old.get("derived") or {}).get("global_batch_size")
    new_batch = (new.get("derived") or {}).get("global_batch_size")
    if old_batch is None or new_batch is None or int(old_batch) == int(new_batch):
        return
    train = new.get("train") or {}
    per_device = train.get("per_device_train_batch_size")
    accumulation = int(train.get("gradient_accumulation_steps") or 1)
    degrees = layout(new, (new.get("derived") or {}).get("data_parallel_degree"))
    ranks = degrees["data"] * degrees["sharding"]
    keep, rest = divmod(int(old_batch), ranks * accumulation)
    fix = (
        f"train.per_device_train_batch_size={keep}"
        if not rest
        else f"per-device batch x gradient accumulation x {ranks} rank(s) = {old_batch}"
    )
    raise ConfigError(
        f"resume={run_dir}: the global batch would be {new_batch} (per-device batch "
        f"{per_device} x accumulation {accumulation} x {ranks} data rank(s)) instead of the "
        f"checkpoint's {old_batch}: the resumed run would skip the trained steps in batches "
        f"of the new size and train on other samples. Keep the global batch: {fix}."
    )


def check_resume_config(run_dir: Path, new: dict[str, Any]) -> list[str]:
    """Warn about changed settings; refuse those the checkpoint cannot honour.

    ``new`` is the resumed run's config; with its ``derived`` section (as the recorded
    one has it) the global batch and a layout change are checked against the resolved
    values. Returns the changes, as recorded in the resolved config.
    """
    diffs, relayout = refuse_resume_changes(run_dir, new)
    lines = [f"{k}: {a!r} -> {b!r}" for k, a, b in diffs]
    if relayout is not None:
        console.warning(
            "resume on a different layout: parallel=%s; PaddleNLP's unified checkpoint "
            "reshards the weights and optimizer state on load.",
            relayout,
        )
        lines.append(f"layout: {relayout}")
    for line in lines:
        log.warning("resume with a changed setting: %s", line)
    return lines


def refuse_resume_changes(
    run_dir: Path, new: dict[str, Any]
) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """Raise ``ConfigError`` for a change the checkpoint cannot honour; else return the
    changed settings and the layout change (None: same layout). Prints nothing: the
    launcher of a multi-process resume calls it before starting any worker."""
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
    # The layout first: a layout the checkpoint cannot take is refused whatever the batch
    # (the batch refusal's advice would not make it resumable).
    relayout = check_layout_change(run_dir, old, new)
    check_global_batch(run_dir, old, new)
    return diffs, relayout


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
