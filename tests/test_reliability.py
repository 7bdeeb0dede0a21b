"""Runs that cannot clobber each other, resumes that cannot damage finished work,
no tracebacks on bad settings or signals. Fast checks of each mechanism here; the resume
items are in ``test_resume.py``, the sweep exit status in ``test_sweep.py``, the security
of reloading in ``test_methods.py``; the long end-to-end runs are marked slow."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import CONF_DIR, CPU, compose_run, without_paddle_vars
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from ftlab.errors import ConfigError, DataError
from ftlab.record.rundir import RunDir, write_text_atomic
from ftlab.record.status import record_status
from ftlab.resolve.validate import validate

# The reliability mechanisms are imported inside the tests, so that on code without one each
# test fails for its own reason rather than all of them at collection.

BIN = Path(sys.executable).parent


def run_cmd(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = without_paddle_vars(os.environ)
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# --------------------------------------------------------------------------- 1, 7, 14: run dirs


def _claim(path: str, queue: Any) -> None:
    from ftlab.record.rundir import claim_new_dir

    queue.put(claim_new_dir(path))


@pytest.mark.fast
def test_run_dirs_are_claimed_exclusively_and_privately(tmp_path: Path) -> None:
    """Two runs started together never share a run dir (names are to the second; a dir is
    claimed exclusively): four processes asking for one name get four dirs."""
    from ftlab.record.rundir import claim_new_dir

    wanted = str(tmp_path / "outputs" / "06-12-13_stories260k_lora")
    queue: Any = multiprocessing.get_context("fork").Queue()
    procs = [
        multiprocessing.get_context("fork").Process(target=_claim, args=(wanted, queue))
        for _ in range(4)
    ]
    old_umask = os.umask(0)  # private whatever the umask
    try:
        for p in procs:
            p.start()
        got = sorted(queue.get(timeout=60) for _ in procs)
    finally:
        os.umask(old_umask)
        for p in procs:
            p.join()
    assert got == [wanted, *(f"{wanted}-{n}" for n in (2, 3, 4))]
    assert all(oct(Path(d).stat().st_mode & 0o777) == "0o700" for d in got)
    assert claim_new_dir(wanted) == claim_new_dir(wanted)  # one dir per name per process


@pytest.mark.fast
def test_every_run_and_sweep_dir_is_named_through_new_dir() -> None:
    import yaml

    hydra = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["hydra"]
    assert hydra["run"]["dir"].startswith("${new_dir:outputs/")
    assert hydra["sweep"]["dir"].startswith("${new_dir:outputs/multirun/")


@pytest.mark.fast
def test_a_given_dir_holding_a_run_is_refused_unless_resumed(tmp_path: Path) -> None:
    from ftlab.record.rundir import RunDirUnusable, check_given_dir

    fresh = tmp_path / "fresh"
    check_given_dir(fresh)  # created, 0700
    assert oct(fresh.stat().st_mode & 0o777) == "0o700"
    check_given_dir(fresh)  # empty: the nodes of one job share it
    (fresh / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirUnusable, match=f"ftlab resume={fresh}"):
        check_given_dir(fresh)
    check_given_dir(fresh, reuse=True)
    (tmp_path / "sweep" / "0_x").mkdir(parents=True)
    (tmp_path / "sweep" / "0_x" / "status.json").write_text("{}")
    with pytest.raises(RunDirUnusable, match="the sweep dir"):
        check_given_dir(tmp_path / "sweep", sweep=True)


@pytest.mark.fast
def test_unwritable_run_dir_is_one_line(tmp_path: Path) -> None:
    """A run dir that cannot be made (under /proc) is one error line, not Hydra's traceback."""
    for args in (["hydra.run.dir=/proc/ftlab-run"], ["-m", "hydra.sweep.dir=/proc/ftlab-sweep"]):
        proc = run_cmd(tmp_path, BIN / "ftlab", *args, "method.lora_rank=2")
        assert proc.returncode == 2
        assert proc.stderr.strip().startswith("ftlab: error: cannot create or write the run dir")
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = run_cmd(Path("/proc"), BIN / "ftlab", "mode=plan")  # outputs/ under /proc
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("ftlab: error: cannot create or write the run dir outputs/")
    from ftlab.record.rundir import RunDirUnusable, claim_new_dir

    with pytest.raises(RunDirUnusable, match="cannot create or write the run dir /proc/x/y"):
        claim_new_dir("/proc/x/y")


@pytest.mark.slow
def test_two_ftlab_started_together_get_two_run_dirs(tmp_path: Path) -> None:
    """Through the command: the same requested name, two processes, two dirs."""
    env = without_paddle_vars(os.environ)
    args = [str(BIN / "ftlab"), "mode=plan", "hydra.run.dir=${new_dir:outputs/same}"]
    procs = [subprocess.Popen([*args, f"train.seed={s}"], cwd=tmp_path, env=env) for s in (1, 2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    dirs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert dirs == ["same", "same-2"]
    seeds = {OmegaConf.load(tmp_path / "outputs" / d / ".hydra/overrides.yaml")[-1] for d in dirs}
    assert seeds == {"train.seed=1", "train.seed=2"}
    assert all((tmp_path / "outputs" / d / "plan.json").is_file() for d in dirs)


# --------------------------------------------------------------------------- 6: a full disk


@pytest.mark.fast
def test_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch) -> None:
    """Recording a failure on a full disk leaves no 0-byte error.txt.tmp behind."""

    def full(self: Path, text: str) -> None:
        self.open("w").close()  # the file is created, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "error.txt", "x")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.fast
def test_status_is_recorded_before_the_traceback_and_a_full_disk_is_not_raised(
    tmp_path: Path, monkeypatch
) -> None:
    from ftlab.record.rundir import DiskFullError

    err = DiskFullError("disk full while writing /x")
    original = Path.write_text

    def full_for_tracebacks(self: Path, text: str) -> int:
        if self.name.startswith("error.txt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return original(self, text)

    monkeypatch.setattr(Path, "write_text", full_for_tracebacks)
    status = record_status(RunDir(tmp_path), time.time(), err)
    assert status["status"] == "failed" and status["error_type"] == "DiskFullError"
    assert json.loads((tmp_path / "status.json").read_text())["error"] == str(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


@pytest.mark.fast
def test_full_disk_errors_are_recognised_through_their_causes() -> None:
    from ftlab.record.rundir import is_disk_full

    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert is_disk_full(rust)
    wrapped = ValueError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert is_disk_full(wrapped) and not is_disk_full(OSError(errno.EACCES, "denied"))


def test_checkpoint_save_on_a_full_disk_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """A save that hits ENOSPC names the checkpoint and the space it needs, and frees the
    partial save (resume never reads .staging)."""
    import paddlenlp.trainer.trainer as paddlenlp_trainer
    from helpers import as_dataset, trainer_for

    from ftlab.record.rundir import DiskFullError

    run = compose_run(["train.max_steps=1", "train.per_device_train_batch_size=2"])
    examples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 6, 7, 2]}] * 2

    def partial_then_full(self: Any, model: Any, metrics: Any = None) -> None:
        staging = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        staging.mkdir(parents=True)
        (staging / "optimizer-00001-of-00001.safetensors").write_bytes(b"\0" * 1000)
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(paddlenlp_trainer.Trainer, "_save_checkpoint", partial_then_full)
    _, _, trainer = trainer_for(run, tmp_path, examples, _tokenizer())
    trainer.train_dataset = as_dataset(examples)
    with pytest.raises(DiskFullError) as caught:
        trainer.train()
    message = str(caught.value)
    assert message.startswith(f"disk full while writing {tmp_path}/checkpoints/checkpoint-1.")
    assert "It needs about 0.5 MiB" in message and "free on that filesystem" in message
    assert not (tmp_path / "checkpoints" / ".staging").exists()


def _tokenizer() -> Any:
    from ftlab.models.loading import load_tokenizer

    return load_tokenizer(compose_run().model)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_disk_full_on_a_real_small_filesystem(tmp_path: Path) -> None:
    """A full disk for real: the run dir on a 400 KiB tmpfs, too small for a checkpoint."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)]).returncode:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        run_dir = mount / "run"
        proc = run_cmd(
            tmp_path,
            BIN / "ftlab",
            "train.max_steps=3",
            "train.save_steps=2",
            "eval.demo_metric=false",
            f"hydra.run.dir={run_dir}",
        )
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        line = [x for x in proc.stderr.splitlines() if x.startswith("ftlab: error:")]
        assert line == [line[0]] and f"writing {run_dir}/checkpoints/checkpoint-2." in line[0]
        assert "It needs about" in line[0]
        status = json.loads((run_dir / "status.json").read_text())
        assert status["status"] == "failed" and status["error_type"] == "DiskFullError"
        assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "checkpoints/.staging").exists()
    finally:
        subprocess.run(["umount", str(mount)])


# --------------------------------------------------------------------------- 8, 9: settings


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.learning_rate=-1e-3"], r"train.learning_rate=-0.001: must be a number > 0\."),
        (["train.learning_rate=nan"], r"train.learning_rate=nan: must be a number > 0"),
        (["train.per_device_train_batch_size=0"], "per_device_train_batch_size=0: must be"),
        (["train.per_device_eval_batch_size=0"], "per_device_eval_batch_size=0: must be"),
        (["train.gradient_accumulation_steps=0"], "gradient_accumulation_steps=0: must be"),
        (["train.max_steps=0", "train.num_train_epochs=0"], "train.max_steps=0: give a number"),
        (["train.max_steps=-2"], "train.max_steps=-2: give a number"),
        (["train.max_steps=-1", "train.num_train_epochs=0"], "nothing to train"),
        (["train.warmup_steps=-1"], "train.warmup_steps=-1: must be a number >= 0"),
        (["train.weight_decay=-0.1"], "train.weight_decay=-0.1: must be"),
        (["train.max_grad_norm=-1"], r"max_grad_norm=-1.0: must be a number >= 0 \(0 turns"),
        (["train.logging_steps=0"], "train.logging_steps=0: must be a number >= 1"),
        (["train.eval_steps=-5"], "train.eval_steps=-5: must be a number >= 0"),
        (["train.save_steps=-1"], "train.save_steps=-1: must be a number >= 0"),
        (["train.save_total_limit=0"], "save_total_limit=0: keep at least 1"),
        (["train.dataloader_num_workers=-1"], "dataloader_num_workers=-1: must be"),
        (["train.seed=-1"], "train.seed=-1: must be a number >= 0"),
        (["train.seed=4294967296"], "must be below 2\\*\\*32"),
        (["eval.max_new_tokens=0"], "eval.max_new_tokens=0: must be"),
        (["eval.batch_size=0"], "eval.batch_size=0: must be"),
        (["parallel.tensor=0"], "parallel.tensor=0: must be a number >= 1"),
        (["parallel.sharding_stage=4"], "parallel.sharding_stage=4: choose"),
        (["launch.nnodes=0"], "launch.nnodes=0: must be a number >= 1"),
    ],
)
def test_numeric_settings_are_range_checked(overrides: list[str], message: str) -> None:
    """Out-of-range numbers fail in validation, not with tracebacks after the data load, and
    max_steps=0 with num_train_epochs=0 does not silently train a whole epoch."""
    with pytest.raises(ConfigError, match=message):
        validate(compose_run(overrides), CPU)


@pytest.mark.slow
def test_a_bad_setting_fails_before_anything_loads(tmp_path: Path) -> None:
    proc = run_cmd(tmp_path, BIN / "ftlab", "train.per_device_train_batch_size=0", "mode=plan")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "ftlab: error: train.per_device_train_batch_size=0: must be a number >= 1."
    )


@pytest.mark.fast
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method.lora_rank=128"],
            r"method.lora_rank=128 exceeds the smaller side of the target layer "
            r"llama.layers.0.self_attn.k_proj \(64 in x 32 out\), which is 32",
        ),
        (["method=qlora", "method.lora_rank=33"], r"lora_rank=33 exceeds .* which is 32"),
        (
            ["method.lora_rank=40", "method.target_modules=['.*q_proj']"],
            r"lora_rank=40 exceeds the smaller side .*q_proj \(64 in x 64 out\), which is 64",
        ),
        (["method=vera", "method.vera_rank=4096"], r"vera_rank=4096 exceeds the number of weights"),
        (
            ["method=lokr", "method.lokr_dim=9"],
            r"lokr_dim=9 exceeds the smaller side of its factor w2 \(8 x 8\)",
        ),
        (["method=reft", "method.reft_rank=65"], "reft_rank=65"),
    ],
)
def test_a_method_size_beyond_its_layers_is_refused(overrides: list[str], message: str) -> None:
    """A method size beyond its layers (lora_rank=128 on hidden size 64) is refused."""
    run = compose_run(overrides)
    if "lora_rank=40" in overrides[0]:
        validate(run, CPU)  # only q_proj (64 x 64) targeted: 40 fits
        run = compose_run([*overrides, "method.lora_rank=65"])
        message = message.replace("40", "65")
    with pytest.raises(ConfigError, match=message):
        validate(run, CPU)


@pytest.mark.fast
@pytest.mark.parametrize(
    "overrides",
    [
        ["method.lora_rank=32"],
        ["method=vera", "method.vera_rank=2048"],
        ["method=lokr", "method.lokr_dim=8"],
    ],
)
def test_sizes_at_the_bound_are_accepted(overrides: list[str]) -> None:
    validate(compose_run(overrides), CPU)


# --------------------------------------------------------------------------- 10: last step


def test_the_last_step_is_logged_whatever_logging_steps(tmp_path: Path) -> None:
    """logging_steps > max_steps still logs the last step's training loss (not n/a)."""
    from helpers import as_dataset, trainer_for

    from ftlab.training.trainer import MetricsJsonl

    run = compose_run(
        ["train.max_steps=3", "train.logging_steps=10", "train.per_device_train_batch_size=2"]
    )
    examples = [{"input_ids": [1, 5, 6, 7], "labels": [-100, 6, 7, 2]}] * 6
    _, _, trainer = trainer_for(
        run, tmp_path, examples, _tokenizer(), [MetricsJsonl(RunDir(tmp_path))], False
    )
    trainer.train_dataset = as_dataset(examples)
    trainer.train()
    rows = RunDir(tmp_path).train_logs()
    assert [r["step"] for r in rows] == [3] and rows[0]["loss"] > 0
    assert rows[0]["tokens_per_second"] > 0


# --------------------------------------------------------------------------- 11, 12: input


def _predict_error(path: Path) -> str:
    from ftlab.cli.predict import read_prompts

    with pytest.raises(DataError) as caught:
        read_prompts(path)
    return str(caught.value)


@pytest.mark.fast
def test_predict_reads_prompts_by_the_training_data_rules(tmp_path: Path) -> None:
    """ftlab-predict reads prompts as training reads records: a JSON-list line and a
    non-UTF-8 byte are named errors, a BOM that training accepts is accepted."""
    from ftlab.cli.predict import read_prompts

    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes(b'\xef\xbb\xbf{"src": "a"}\n\n{"prompt": "b", "id": 2}\n')
    assert read_prompts(prompts) == [{"src": "a"}, {"prompt": "b", "id": 2}]
    prompts.write_text('{"src": "a"}\n["src", "b"]\n')
    assert _predict_error(prompts) == (
        f"{prompts}:2: expected a JSON object per line, found a list. Fix the line."
    )
    prompts.write_bytes(b'{"src": "a"}\n{"src": "caf\xe9"}\n')
    assert _predict_error(prompts).startswith(
        f"{prompts}:2: not valid UTF-8 (byte offset 25 in the file"
    )
    prompts.write_text('{"src": "a"}\n{"text": "b"}\n')
    assert _predict_error(prompts) == f"{prompts}:2: needs a string field 'src' or 'prompt'."


@pytest.mark.fast
def test_duplicate_keys_are_rejected_with_file_and_line(tmp_path: Path) -> None:
    """A repeated key in a record is refused with file and line, not silently overwritten."""
    from ftlab.data.records import BadRecords, iter_records
    from ftlab.data.stats import SplitStats

    data = tmp_path / "train.json"
    data.write_text('{"src": "a", "tgt": "b"}\n{"src": "a", "tgt": "b", "tgt": ""}\n')
    stats = SplitStats()
    with pytest.raises(DataError, match=f"{data}:2: key 'tgt' appears more than once"):
        list(iter_records(data, BadRecords("error", stats), stats))
    stats = SplitStats()
    kept = list(iter_records(data, BadRecords("skip", stats), stats))
    assert len(kept) == 1 and stats.skipped == {"duplicate_key": 1}
    nested = tmp_path / "messages.json"
    nested.write_text('{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}\n')
    with pytest.raises(DataError, match=f"{nested}:1: key 'role' appears more than once"):
        list(iter_records(nested, BadRecords("error", SplitStats()), SplitStats()))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"src": "a", "src": "b"}\n')
    assert _predict_error(prompts).startswith(f"{prompts}:1: key 'src' appears more than once")


# --------------------------------------------------------------------------- 15: paths


NASTY = [
    "/runs/1_eval.demo_metric=False,parallel=dp2,train.max_steps=3",
    "/runs/with space/and 'single' and \"double\" quotes",
    "/runs/back\\slash\\",
    "/runs/it\\'s",
    "/runs/${now:%H}/[a,b]/{k: v}",
    "/runs/ünï ©ode=1,2",
]


@pytest.mark.fast
@pytest.mark.parametrize("path", NASTY)
def test_any_path_survives_being_passed_to_workers(path: str) -> None:
    """A sweep job dir (with '=' and ',') is passed quoted to the workers (unquoted it failed
    with "mismatched input '='"); each of these paths reaches the worker unchanged."""
    from ftlab.distributed.launch import worker_overrides

    args = worker_overrides(["parallel=dp2", "train.max_steps=3"], Path(path))
    parsed = OverridesParser.create().parse_overrides(args)
    assert [o.key_or_group for o in parsed][:3] == ["parallel", "train.max_steps", "hydra.run.dir"]
    assert OmegaConf.create({"d": parsed[2].value()}).d == path


@pytest.mark.fast
@pytest.mark.parametrize("path", NASTY)
def test_quoted_overrides_read_back_unchanged(path: str) -> None:
    from ftlab.config.overrides import given_value, override, quote

    assert quote(path).startswith("'") and quote(path).endswith("'")
    value = given_value(["-m", override("hydra.run.dir", path), "x=1"], "hydra.run.dir")
    assert OmegaConf.create({"d": value}).d == path


@pytest.mark.fast
def test_resume_of_a_dir_with_nasty_characters_is_replayed_quoted(tmp_path: Path) -> None:
    from ftlab.record.resume import replay_argv

    run_dir = tmp_path / "0_a=1,b=2 it's"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- method.lora_rank=4\n")
    argv = replay_argv([f"rerun={run_dir}", "train.max_steps=3"])
    parsed = OverridesParser.create().parse_overrides(argv)
    values = {o.key_or_group: o.value() for o in parsed}
    assert values["rerun"] == str(run_dir) and values["method.lora_rank"] == 4


def sweep_of_two_steps(tmp_path: Path, *overrides: str) -> tuple[Path, list[dict[str, str]]]:
    """Run ``ftlab -m <overrides>`` (2 steps per job) to exit 0; its dir and summary rows."""
    import csv

    sweep_dir = tmp_path / "sweep"
    proc = run_cmd(
        tmp_path,
        BIN / "ftlab",
        "-m",
        *overrides,
        "train.max_steps=2",
        "train.logging_steps=1",
        "eval.demo_metric=false",
        f"hydra.sweep.dir={sweep_dir}",
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(sweep_dir / "summary.csv") as f:
        return sweep_dir, list(csv.DictReader(f))


@pytest.mark.slow
def test_sweep_over_layouts_completes_every_job(tmp_path: Path) -> None:
    """``ftlab -m parallel=single,dp2,sharding_stage1`` completes its multi-process jobs;
    with tensor and pipeline parallel (CPU emulation) every job completes and the
    summary compares them."""
    layouts = ["single", "dp2", "sharding_stage1", "tp2", "pp2"]
    sweep_dir, rows = sweep_of_two_steps(
        tmp_path,
        f"parallel={','.join(layouts)}",
        "parallel.cpu_emulation=true",
        "method=full",
        "train.per_device_train_batch_size=4",
    )
    assert [r["parallel"] for r in rows] == layouts
    assert [r["status"] for r in rows] == ["completed"] * len(layouts)
    assert all(float(r["final_loss"]) > 0 and float(r["eval_loss"]) > 0 for r in rows)
    # tensor and pipeline parallel see the single process's batches: same losses.
    by_layout = {r["parallel"]: float(r["final_loss"]) for r in rows}
    for layout in ("tp2", "pp2"):
        assert abs(by_layout[layout] - by_layout["single"]) <= 1e-4, by_layout
    md = (sweep_dir / "summary.md").read_text()
    assert "- jobs: 5 (5 completed)" in md
    for job in range(len(layouts)):
        run_dir = next(sweep_dir.glob(f"{job}_*"))
        assert "=" in run_dir.name and "," in run_dir.name
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_sweep_of_lora_ranks_over_layouts(tmp_path: Path) -> None:
    """A sweep over sizes and layouts, ``ftlab -m method.lora_rank=4,8,16 parallel=single,dp2`` (two
    ranks here): every job completes on its layout (dp2: two ranks of 16, a global batch of
    32; the two-processes-equal-one claim is ``test_distributed.py``'s)."""
    sweep_dir, rows = sweep_of_two_steps(tmp_path, "method.lora_rank=4,8", "parallel=single,dp2")
    assert [r["status"] for r in rows] == ["completed"] * 4
    loss = {(r["method.lora_rank"], r["parallel"]): float(r["final_loss"]) for r in rows}
    assert set(loss) == {(k, p) for k in ("4", "8") for p in ("single", "dp2")}
    assert all(0 < v < 10 for v in loss.values()), loss
    for job in sweep_dir.glob("[0-9]*_*"):
        summary = json.loads((job / "summary.json").read_text())
        world = 2 if "parallel=dp2" in job.name else 1
        assert summary["derived"]["world_size"] == world and summary["steps"] == 2, job.name


# --------------------------------------------------------------------------- 4, 5: signals


@pytest.mark.fast
def test_an_interruption_is_recorded_with_its_signal(tmp_path: Path) -> None:
    from ftlab.errors import Interrupted

    status = record_status(RunDir(tmp_path), time.time(), Interrupted(signal.SIGTERM), {"x": 1})
    assert status["status"] == "interrupted" and status["signal"] == "SIGTERM"
    assert "error_type" not in status and not (tmp_path / "error.txt").exists()


def test_paddles_launcher_writes_no_environment(tmp_path: Path, monkeypatch) -> None:
    """Paddle's launcher writes no envlog.*, backup_env.*.json or pod log (each holding the
    whole environment) into the run dir."""
    from paddle.distributed.launch.controllers.controller import Controller
    from paddle.distributed.launch.utils import process_context

    from ftlab.distributed.paddle_launch import quiet_env_dumps

    for target, name in ((Controller, "_save_container_env"), (Controller, "save_pod_log")):
        monkeypatch.setattr(target, name, getattr(target, name))
    monkeypatch.setattr(
        process_context.ProcessContext, "_start", process_context.ProcessContext._start
    )
    quiet_env_dumps()
    Controller._save_container_env(object(), object())
    Controller.save_pod_log(object(), "endpoints")
    env = {"SECRET_TOKEN": "hunter2", "PADDLE_LOG_DIR": str(tmp_path), "PADDLE_TRAINER_ID": "0"}
    out = open(tmp_path / "workerlog.0", "w")
    ctx = process_context.ProcessContext(
        [sys.executable, "-c", "import os; print(os.environ.get('SECRET_TOKEN'))"], env, out, out
    )
    ctx.start()
    ctx._proc.wait()
    out.close()
    assert (tmp_path / "workerlog.0").read_text() == "hunter2\n"  # the worker has its env
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workerlog.0"]
    # Endpoint lists too long for an environment still reach the worker, and only they.
    long = ",".join(["127.0.0.1:6070"] * 4000)
    env.update(PADDLE_TRAINER_ENDPOINTS=long)
    monkeypatch.setenv("PADDLE_ENV_LIMIT_LEN", "1000")
    ctx = process_context.ProcessContext([sys.executable, "-c", "pass"], env, None, None)
    ctx.start()
    ctx._proc.wait()
    backup = json.loads((tmp_path / "backup_env.0.json").read_text())
    assert backup == {"PADDLE_TRAINER_ENDPOINTS": long}
    assert oct((tmp_path / "backup_env.0.json").stat().st_mode & 0o777) == "0o600"


CHAIN = """
import os, subprocess, sys, time
from ftlab.distributed.launch import PARENT_PID_ENV
if sys.argv[1] == "parent":
    env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-c", sys.argv[2], "child", sys.argv[3]], env=env)
    time.sleep(float(sys.argv[4]))
    os._exit(0)  # the launcher dies without stopping its child
import signal
from ftlab.distributed.launch import die_with_parent
die_with_parent(signal.SIGKILL)
open(sys.argv[2], "w").write(str(os.getpid()))
time.sleep(600)
"""


def _processes_naming(path: Path) -> list[int]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if str(path) in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
            found.append(p.pid)
    return found


@pytest.mark.fast
def test_a_worker_dies_with_its_launcher(tmp_path: Path) -> None:
    """SIGKILL of the launcher does not leave the workers training. A process that asked to
    die with its parent is gone once the parent is (also when the parent died first)."""
    for delay in ("3", "0"):
        mark = tmp_path / f"child{delay}"
        parent = subprocess.run(
            [sys.executable, "-c", CHAIN, "parent", CHAIN, str(mark), delay], timeout=120
        )
        assert parent.returncode == 0
        if delay == "3":
            assert mark.is_file()  # the child was running when its parent died

        deadline = time.time() + 30
        while _processes_naming(mark) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_naming(mark) == []


SIGNAL_RUN = [
    "train.max_steps=200",
    "train.save_steps=2",
    "train.logging_steps=1",
    "eval.demo_metric=false",
    "eval.generation=false",  # the base eval before training: ~1.6 s CPU, read by no test
]


def interrupt_run(tmp_path: Path, sig: int, *extra: str) -> tuple[Any, Path, list[Any]]:
    """Start a real run, send ``sig`` once checkpoint-2 exists; (proc, run dir, workers)."""
    import psutil

    run_dir = tmp_path / "run"
    env = without_paddle_vars(os.environ)
    env["FTLAB_TEST_SECRET"] = "hunter2"
    proc = subprocess.Popen(
        [str(BIN / "ftlab"), *SIGNAL_RUN, *extra, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = time.time()
    while not (run_dir / "checkpoints" / "checkpoint-2").is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - start < 600
        time.sleep(0.1)
    workers = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    proc.stdout_text, proc.stderr_text = out, err
    return proc, run_dir, workers


def assert_interrupted(proc: Any, run_dir: Path, sig: int) -> None:
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig
    assert "Traceback" not in proc.stderr_text
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["signal"] == name
    checkpoint = Path(status["last_checkpoint"])
    assert checkpoint.parent == run_dir / "checkpoints" and checkpoint.is_dir()
    assert status["resume"] == f"ftlab resume={run_dir}"
    line = [x for x in proc.stderr_text.splitlines() if x.startswith("ftlab: interrupted")]
    assert line == [
        f"ftlab: interrupted by {name}; last checkpoint: {checkpoint} (step "
        f"{checkpoint.name.split('-')[1]}). Resume with: ftlab resume={run_dir}"
    ]


def test_sigterm_ends_a_run_cleanly(tmp_path: Path) -> None:
    """SIGTERM ends a run with one line and an "interrupted" record that ftlab-runs shows,
    although Paddle's import replaces the signal handler."""
    proc, run_dir, _ = interrupt_run(tmp_path, signal.SIGTERM)
    assert_interrupted(proc, run_dir, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_ends_a_run_cleanly(tmp_path: Path) -> None:
    """SIGINT ends a run with one line and a record, no KeyboardInterrupt traceback."""
    proc, run_dir, _ = interrupt_run(tmp_path, signal.SIGINT)
    assert_interrupted(proc, run_dir, signal.SIGINT)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_the_launcher_takes_its_workers_down(sig: int, tmp_path: Path) -> None:
    """SIGTERM or SIGKILL to the launcher of a dp2 run takes its workers down (they trained
    on, orphaned) and leaves no environment dump in the run dir."""
    import psutil

    proc, run_dir, workers = interrupt_run(
        tmp_path, sig, "parallel=dp2", "train.per_device_train_batch_size=4"
    )
    assert len(workers) == 3  # Paddle's launcher and two workers
    deadline = time.time() + 60
    while time.time() < deadline and any(
        w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers
    ):
        time.sleep(0.2)
    assert not [w.pid for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    # Per rank: its complete log and its console; no environment dump.
    logs = sorted(p.name for p in (run_dir / "logs").iterdir())
    assert logs == ["train.0.log", "train.1.log", "workerlog.0", "workerlog.1"], logs
    assert not [f for f in run_dir.rglob("*") if f.is_file() and b"hunter2" in f.read_bytes()]
    if sig == signal.SIGTERM:
        assert_interrupted(proc, run_dir, sig)
    else:
        assert proc.returncode == -signal.SIGKILL
