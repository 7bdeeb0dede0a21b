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
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore

from ftlab.assets import asset_path
from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.resolve.compose import register_configs, to_run_config

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


def run_ftlab(cwd: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real ``ftlab`` command in ``cwd`` (its ``outputs/`` lands there), with no
    ``PADDLE_*`` variable of the test process leaking into it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PADDLE_")}
    proc = subprocess.run(
        [str(FTLAB), *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"ftlab failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


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
