"""``RunDir``: the experiment directory of one run, its file names and every write into it.

Every module that reads or writes a run's files goes through this class, so the layout
lives here once (the tree in docs/rundir.md). Writes are atomic (a reader never sees half a file)
and happen on the main process only: a ``RunDir`` made with ``is_main=False`` (the other
ranks of a multi-process run) ignores every write, so the orchestration needs no rank
checks.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ftlab.errors import FtlabError

HYDRA = ".hydra"
RESOLVED_CONFIG = "resolved_config.yaml"
ENVIRONMENT = "environment.json"
FINGERPRINTS = "data_fingerprints.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SAMPLES = "samples.jsonl"
COMPLETIONS = "completions.jsonl"  # stage=grpo: sampled completions with their rewards
PREDICTIONS = "predictions.jsonl"  # dev generations scored by BLEU/ROUGE (eval.generation)
STATUS = "status.json"
ERROR = "error.txt"
PLAN = "plan.json"
AUTO_LAYOUT = "auto_layout.json"  # parallel=auto: every candidate layout and the choice
EXPORT = "run_finetune.json"
EXPORT_NOTES = "run_finetune_notes.json"
# A Hugging Face base model's conversion: source files' sha256, cache entry, name mappings.
MODEL_SOURCE = "model_source.json"
VISUALDL = "visualdl"
TENSORBOARD = "tensorboard"  # train.report_to: tensorboard (tensorboardX event files)
WANDB = "wandb"  # train.report_to: wandb (offline run, under <run dir>/wandb/)
MLFLOW_RUN = "mlflow_run.json"  # train.report_to: mlflow: the run's MLflow run (a resume reuses it)
MLFLOW_PARENT = "mlflow_parent.json"  # in a sweep dir: the sweep's MLflow parent run
CHECKPOINTS = "checkpoints"
FINAL = "final"
LOGS = "logs"
MERGED = "merged"
# Inside final/: which method and base model the saved artefact belongs to.
METHOD_RECORD = "ftlab_method.json"
BASE_WEIGHTS = "base_weights_sha256"  # in METHOD_RECORD: file name -> sha256 of the base
# What only a run that trained leaves behind: a later run must not write over it.
RESULTS = (STATUS, SUMMARY, METRICS, CHECKPOINTS)
# Run and sweep dirs are private to their owner: the environment record, the logs and the
# checkpoints are nobody else's business (chmod the dir to share it).
DIR_MODE = 0o700


class RunDirUnusable(FtlabError):
    """A run dir (or sweep dir) that cannot be created, written, or must not be reused."""


class DiskFullError(FtlabError):
    """The filesystem of the run dir ran out of space (or quota) while ftlab wrote to it."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a failed write leaves no ``.tmp`` behind)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- claiming dirs

_LOCKS: dict[str, int] = {}  # run dir -> the open descriptor holding its lock


def lock_run_dir(path: Path | str) -> bool:
    """Hold an exclusive lock on a run dir until this process exits; False when another
    process holds it. ``flock`` on the directory itself: no lock file to leave behind,
    and the kernel releases it when the owner dies (even by SIGKILL)."""
    import fcntl

    key = str(Path(path).resolve())
    if key in _LOCKS:
        return True
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _LOCKS[key] = fd
    return True


def claim_new_dir(path: str) -> str:
    """Create ``path`` as a new directory, exclusively, private to its owner; return it.

    The one rule for every run and sweep dir ftlab names itself (``conf/train.yaml`` calls
    it through the ``${new_dir:...}`` resolver): ``mkdir`` without ``exist_ok`` succeeds for
    exactly one process, so two runs started in the same second get ``<name>`` and
    ``<name>-2``, never one shared dir. A dir given explicitly (``hydra.run.dir=...``: a
    resume, the workers and nodes of one job) goes through ``check_given_dir`` instead.
    Results are memoised per requested path: Hydra may resolve the name more than once.
    """
    if path in _CLAIMED:
        return _CLAIMED[path]
    base = Path(path)
    _make_parents(base)
    n = 1
    while True:
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(mode=DIR_MODE)
        except FileExistsError:
            n += 1
            continue
        except OSError as err:
            raise _unusable(candidate, err) from None
        os.chmod(candidate, DIR_MODE)  # exactly 0700, whatever the umask
        _CLAIMED[path] = str(candidate)
        return str(candidate)


_CLAIMED: dict[str, str] = {}


def check_given_dir(path: Path, *, sweep: bool = False, reuse: bool = False) -> None:
    """Make sure an explicitly given run (or sweep) dir can be written and may be used.

    Called before Hydra writes anything into it. A missing dir is created (0700); an
    existing one must be writable and, unless ``reuse`` (a resume continues its own run),
    must not hold another run's results: a new run would interleave its metrics with
    theirs and overwrite their checkpoints and ``final/``.
    """
    if not path.exists():
        _make_parents(path)
        try:
            path.mkdir(mode=DIR_MODE)
        except FileExistsError:
            pass  # another node of the same job made it first
        except OSError as err:
            raise _unusable(path, err) from None
        else:
            os.chmod(path, DIR_MODE)
    if not path.is_dir():
        raise RunDirUnusable(f"{path} exists and is not a directory. Choose another path.")
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise _unusable(path, err) from None
    if reuse:
        return
    holders = [path] if not sweep else sorted(p for p in path.iterdir() if p.is_dir())
    for holder in holders:
        found = [name for name in RESULTS if (holder / name).exists()]
        if found:
            what = "the sweep dir" if sweep else "the run dir"
            raise RunDirUnusable(
                f"{what} {path} already holds the results of a run ({holder / found[0]}); "
                "a new run would mix its files with them. Choose a new directory, or "
                f"continue that run with: ftlab resume={holder}"
            )


def _make_parents(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unusable(path, err) from None


def _unusable(path: Path, err: OSError) -> RunDirUnusable:
    return RunDirUnusable(
        f"cannot create or write the run dir {path}: {err.strerror or err}. Choose a writable "
        "location with hydra.run.dir=... (or hydra.sweep.dir=... for a sweep)."
    )


# --------------------------------------------------------------------------- a full disk

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports a full disk in its own exception type, by message only.
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(err: BaseException | None) -> bool:
    """True when ``err`` (or an error it was raised from) is a full disk or quota."""
    seen = 0
    while err is not None and seen < 10:
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def disk_full_message(path: Path, needed: int | None = None) -> str:
    """One line: where the write failed, what it needed and what is free there."""
    free = _free_bytes(path)
    need = f" It needs about {_mib(needed)};" if needed else ""
    return (
        f"disk full while writing {path}.{need} {_mib(free)} free on that filesystem. Free "
        "some space (or move hydra.run.dir to a larger disk), then continue the run with "
        "resume= (or start it again)."
    )


def _free_bytes(path: Path) -> int:
    import shutil

    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return 0


def _mib(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def dir_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class RunDir:
    """One run's directory (see "The experiment directory" in docs/rundir.md)."""

    def __init__(self, path: Path | str, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ places

    @property
    def hydra(self) -> Path:
        return self.path / HYDRA

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.path / FINAL

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    @property
    def visualdl(self) -> Path:
        return self.path / VISUALDL

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def merged(self) -> Path:
        return self.path / MERGED

    # ------------------------------------------------------------------ writes

    def create(self) -> None:
        """Make the dir if a caller outside the ``ftlab`` command has not (0700)."""
        if self.is_main and not self.path.is_dir():
            check_given_dir(self.path, reuse=True)

    def write_json(self, name: str, obj: Any) -> None:
        if self.is_main:
            write_json_atomic(self.path / name, obj)

    def write_text(self, name: str, text: str) -> None:
        if self.is_main:
            write_text_atomic(self.path / name, text)

    def append_jsonl(self, name: str, obj: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.path / name, "a") as f:
                f.write(json.dumps(obj, sort_keys=True) + "\n")

    def write_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        if self.is_main:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            write_text_atomic(self.path / name, text)

    def truncate_metrics(self, step: int) -> int:
        """Drop metric lines after ``step`` (a resumed run logs those steps again)."""
        if not self.is_main:
            return 0
        lines = self.read_jsonl(METRICS)
        kept = [x for x in lines if x.get("step", 0) <= step]
        write_text_atomic(self.metrics, "".join(json.dumps(x, sort_keys=True) + "\n" for x in kept))
        return len(lines) - len(kept)

    def save_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer beside the trained artefact in ``final/`` (pad token included)."""
        if self.is_main:
            tokenizer.save_pretrained(str(self.final))

    def write_final_scalars(self, step: int, scalars: dict[str, list[tuple[int, float]]]) -> None:
        """Post-training scalars, in their own VisualDL file of the run's log dir.

        PaddleNLP's VisualDL callback closes its writer at the end of training, so the
        final evaluation and the task metric would otherwise never reach VisualDL.
        ``scalars`` maps a tag to its (step, value) points.
        """
        if not self.is_main:
            return
        from visualdl import LogWriter

        with LogWriter(logdir=str(self.visualdl), file_name="vdlrecords.final.log") as writer:
            for tag, points in scalars.items():
                for at, value in points:
                    writer.add_scalar(tag, float(value), at)

    def write_method_record(
        self, method: str, base_model: str, base_weights: dict[str, str] | None = None
    ) -> None:
        """``final/ftlab_method.json``: what ``ftlab-predict`` and ``ftlab-merge`` reload,
        with the base's weight hashes (``base_weights_sha256``, local bases only)."""
        if self.is_main:
            record: dict[str, Any] = {"method": method, "base_model": base_model}
            if base_weights:
                record[BASE_WEIGHTS] = base_weights
            write_json_atomic(self.final / METHOD_RECORD, record)

    # ------------------------------------------------------------------ reads

    def exists(self, name: str) -> bool:
        return (self.path / name).is_file()

    def read_json(self, name: str) -> dict[str, Any]:
        """The file's object, or {} when it does not exist."""
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_yaml(self, name: str) -> Any:
        """The file's YAML (interpolations left as plain strings), or {} when absent."""
        path = self.path / name
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def train_logs(self) -> list[dict[str, Any]]:
        """The per-step training lines of ``metrics.jsonl``."""
        return [x for x in self.read_jsonl(METRICS) if x.get("kind") == "train"]
