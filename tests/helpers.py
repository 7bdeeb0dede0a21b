"""What several test files share: composing the real config, injected environments, running
the ``ftlab`` commands, PaddleNLP's own argument parser, tiny models and the Trainer in
miniature.

Test files import these from here, not from each other (importing a test module runs its
collection-time code and can pull its fixtures into another module). Nothing here imports
Paddle at module level, so the tests of ``make test-fast`` can import it.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from ftlab.assets import asset_path
from ftlab.config.cpu_runtime import use_fast_mkl_path
from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.resolve.compose import register_configs, to_run_config

# Every test process computes on the MKL path an ftlab process takes, chosen before Paddle
# loads (this module is imported before any test module): otherwise a test process's path
# (and the last bits of its float results) would depend on whether an in-process ftlab
# command had set it before the process's first MKL call.
use_fast_mkl_path()
# The environment of this test process at its start, with that choice: the server that forks
# ftlab runs starts with it (``run_ftlab_forked``).
START_ENVIRONMENT = dict(os.environ)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"
DEMO = asset_path("demo_stories")

# Injected environments: validation and plans are checked against them on any machine.
CPU = Environment(device="cpu", device_count=2, paddle_version="3.3.1")
GPU8 = Environment(
    device="gpu", device_count=8, paddle_version="3.3.1", gpu_compute_capability=(9, 0)
)

# --------------------------------------------------------------------------- composing


# Hydra composes ``train`` in ~0.13 s CPU, and the tests compose the same override lists
# again and again (~460 compositions, ~100 repeats, in ``make test-fast``). The result
# depends only on the overrides, the conf tree and the ConfigStore's nodes (a test may store
# a method of its own): each distinct key is composed once per process and every caller gets
# a deep copy (4 ms), so a test may change its copy. A composition error is not cached.
_COMPOSED: dict[tuple, Any] = {}


def _store_nodes(repo: dict) -> tuple:
    """The ConfigStore's entries by identity (a re-stored node is a new object)."""
    return tuple(
        (key, _store_nodes(value) if isinstance(value, dict) else id(value))
        for key, value in repo.items()
    )


def compose_cfg(overrides: list[str] | None = None):
    register_configs()
    key = (tuple(overrides or []), _store_nodes(ConfigStore.instance().repo))
    if key not in _COMPOSED:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            _COMPOSED[key] = compose("train", overrides=list(key[0]))
    return copy.deepcopy(_COMPOSED[key])


def compose_run(overrides: list[str] | None = None) -> RunConfig:
    return to_run_config(compose_cfg(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# --------------------------------------------------------------------------- commands

FTLAB = Path(sys.executable).with_name("ftlab")


def without_paddle_vars(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without its ``PADDLE_*`` variables: an ``ftlab`` a test starts must not
    take the test process's (a launcher's worker would read them as its rank and job)."""
    return {k: v for k, v in environ.items() if not k.startswith("PADDLE_")}


def run_ftlab(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real ``ftlab`` command in ``cwd`` (its ``outputs/`` lands there), with no
    ``PADDLE_*`` variable of the test process leaking into it."""
    env = without_paddle_vars(os.environ)
    proc = subprocess.run(
        [str(FTLAB), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ftlab failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_ftlab_forked(
    cwd: Path, *overrides: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess:
    """The real ``ftlab`` command (``ftlab.cli.app.main`` with these arguments) in ``cwd``,
    in a process forked from a server that has imported Paddle and PaddleNLP once: its exit
    status, stdout and stderr, as ``run_ftlab`` returns them.

    Why: a new ``ftlab`` process spends ~4 s of CPU importing Paddle and PaddleNLP before
    its first line of work; a fork of a process that imported them starts at ``main()``
    (a two-step run: 5.9 -> 2.5 s, the same losses bit for bit). The server
    (multiprocessing's forkserver, one per test process, started on first use) imports
    and nothing else: no test ran in it, no thread or loader of Paddle's is alive in it,
    so a fork starts as a new process would, with this test's environment (no
    ``PADDLE_*`` variable) and working directory, and ends as the console script ends.
    For tests that check what a run does and writes; what concerns the process itself
    (its start, signals, the console script's exit, variables read when Paddle loads,
    launched workers) keeps the subprocess of ``run_ftlab``. The one visible difference:
    the ``cpu`` line says Paddle was loaded before ftlab chose MKL's path (this module
    chose the same path before the server started)."""
    context = _ftlab_server()
    args = ["ftlab", *overrides]
    with tempfile.TemporaryDirectory() as scratch:
        out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
        env = without_paddle_vars(os.environ)
        child = context.Process(target=_forked_ftlab, args=(Path(cwd), args, out, err, env))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(args, timeout)
        proc = subprocess.CompletedProcess(
            args,
            child.exitcode,
            out.read_text(errors="replace") if out.exists() else "",
            err.read_text(errors="replace") if err.exists() else "",
        )
    if check and proc.returncode != 0:
        raise AssertionError(f"ftlab failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def _ftlab_server() -> Any:
    """The multiprocessing context whose server forks the ftlab runs, running. The server
    starts with the environment this test process started with (not one a test changed
    since): Paddle, PaddleNLP and huggingface_hub read some variables when they load."""
    import multiprocessing
    import multiprocessing.forkserver

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["ftlab.training.run", "ftlab.cli.app", "helpers"])
    now = dict(os.environ)
    os.environ.clear()
    os.environ.update(without_paddle_vars(START_ENVIRONMENT))
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(now)
    return context


def _forked_ftlab(cwd: Path, argv: list[str], out: Path, err: Path, env: dict) -> None:
    """In the forked child: the caller's environment and directory, stdout / stderr into
    files, ``main()``, then the console script's end (``ftlab.cli.process_exit.finish``:
    ``atexit`` handlers, flush, ``os._exit``). An error before ``main()`` ends the child
    as multiprocessing ends one: the traceback, exit status 1."""
    from ftlab.cli.app import main  # imported by the server
    from ftlab.cli.process_exit import finish

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = argv
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = _exit_status(exit_.code)
    except BaseException:  # noqa: BLE001 - an uncaught error ends a process this way
        traceback.print_exc()
        code = 1
    finish(code)


def _exit_status(code: Any) -> int:
    """What ``sys.exit(code)`` makes a process's exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_predict(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(FTLAB.with_name("ftlab-predict")), *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ftlab-predict failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_in_process(command: str, *args: str) -> int:
    """``ftlab-predict`` or ``ftlab-merge`` (``command``) as a call of its ``main`` in this
    process; its exit code. For a test that checks what the command writes, not how it
    starts, prints or exits (each command's subprocess tests do that): a subprocess spends
    ~4.5 s of CPU importing Paddle and PaddleNLP first. The environment is restored after
    the call (the commands set MKL's CPU path for the processes they would start,
    ``ftlab.config.cpu_runtime``)."""
    from ftlab.cli import merge, predict

    main = {"ftlab-predict": predict.main, "ftlab-merge": merge.main}[command]
    saved = dict(os.environ)
    try:
        return main(list(args))
    finally:
        os.environ.clear()
        os.environ.update(saved)


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice): tests that run a launcher or
    a master take one each, so tests running in parallel never meet on a port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- PaddleNLP parser


def parse_like_run_finetune(path: Path) -> tuple:
    """What llm/run_finetune.py does with a .json argument file (its wheel dataclasses)."""
    from paddlenlp.trainer import PdArgumentParser
    from paddlenlp.trl import DataConfig, ModelConfig, SFTConfig

    parser = PdArgumentParser((ModelConfig, DataConfig, SFTConfig))
    return parser.parse_json_file(str(path), return_remaining_strings=True)


# --------------------------------------------------------------------------- tiny models, losses


def data_for(tok: Any, path: Path, **overrides: Any) -> Any:
    """``build_data`` on ``path`` with a data config of ``overrides`` (no dev split)."""
    from ftlab.config.schema import DataConfig
    from ftlab.data.build import build_data

    cfg = DataConfig(name="t", path=str(path), **overrides)
    return build_data(cfg, tok, seed=0, need_dev=False)


def tiny_model(family: str) -> Any:
    """A 2-layer random Llama or Qwen2 with large weights (peaked attention, leaks show)."""
    import paddle

    paddle.seed(7)
    common = dict(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.5,
    )  # large weights: peaked attention, leaks show
    if family == "llama":
        from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        from paddlenlp.transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**common))
    model.eval()
    return model


def token_losses(model: Any, batch: dict) -> np.ndarray:
    """Per-token cross entropy of ``batch`` (NaN where the label is ignored)."""
    import paddle

    with paddle.no_grad():
        logits = model(
            **{k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels"}, return_dict=True
        ).logits
    logp = paddle.nn.functional.log_softmax(logits.astype("float32"), -1).numpy()
    labels = batch["labels"]
    picked = np.take_along_axis(logp, np.where(labels < 0, 0, labels)[..., None], -1)[..., 0]
    return np.where(labels < 0, np.nan, -picked)


def alone_loss(model: Any, ids: np.ndarray, labels: np.ndarray) -> float:
    """The loss of one example fed alone (what packing must reproduce)."""
    import paddle

    with paddle.no_grad():
        out = model(
            input_ids=paddle.to_tensor(ids[None].astype("int64")),
            labels=paddle.to_tensor(labels[None].astype("int64")),
            return_dict=True,
        )
    return float(out.loss)


# ------------------------------------------------------------------- the Trainer in miniature

# A few steps at a high constant learning rate: adapters end far from their initial values.
TRAIN = [
    "train.learning_rate=1e-2",
    "train.lr_scheduler_type=constant",
    "train.warmup_steps=0",
    "train.logging_steps=1",
    "train.max_steps=4",
    "train.per_device_train_batch_size=4",
    "train.max_grad_norm=0",
]


def as_dataset(items: list[dict]) -> Any:
    """The examples as a map-style ``paddle.io.Dataset`` (what the Trainer accepts)."""
    import paddle

    class Items(paddle.io.Dataset):
        def __len__(self) -> int:
            return len(items)

        def __getitem__(self, i: int) -> dict:
            return items[i]

    return Items()


def collate(tokenizer: Any, items: list[dict]) -> dict[str, Any]:
    from ftlab.data.collate import Collator

    return Collator(tokenizer.pad_token_id)(items)


def logits_of(model: Any, batch: dict[str, Any]) -> np.ndarray:
    import paddle

    model.eval()
    with paddle.no_grad():
        out = model(
            input_ids=paddle.to_tensor(batch["input_ids"]),
            attention_mask=paddle.to_tensor(batch["attention_mask"]),
        )
    if isinstance(out, (tuple, list)):
        out = out[0]
    return (out if isinstance(out, paddle.Tensor) else out.logits).numpy()  # OPT: a bare tensor


def trainer_for(
    run: Any,
    run_dir: Path,
    examples: list[dict],
    tokenizer: Any,
    callbacks: list[Any] | None = None,
    save_checkpoints: bool = True,
) -> tuple[Any, Any, Any]:
    """The runner's path in miniature: apply the method, wrap it in FtlabTrainer."""
    import paddle

    from ftlab.data.collate import Collator, count_tokens
    from ftlab.methods.catalog import get_method
    from ftlab.models.loading import load_model
    from ftlab.training.arguments import training_arguments
    from ftlab.training.trainer import FtlabTrainer

    paddle.seed(0)
    method = get_method(run.method.name)
    model = method.apply(load_model(run.model, "float32"), run.method, run.model)
    args = training_arguments(
        run,
        run_dir,
        run.train.max_steps,
        has_eval=False,
        unified_checkpoint=method.unified_checkpoint,
    )
    args.report_to = []
    args.disable_tqdm = True
    if not save_checkpoints:
        args.save_strategy = "no"
    trainer = FtlabTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(examples),
        tokenizer=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
        count_tokens=count_tokens,
        shuffle=False,
        callbacks=callbacks,
    )
    return method, model, trainer
