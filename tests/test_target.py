"""Plan and export for the target machine: ``device=gpu`` validates against a described GPU
machine on this CPU machine, and says what it assumed."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
from helpers import CPU, REPO, compose_cfg, compose_run, parse_like_run_finetune

from ftlab.config.environment import run_environment, target_environment
from ftlab.errors import ConfigError
from ftlab.resolve.validate import validate, validate_for

MISSION = ["method=qlora", "model=llama3", "parallel=tp4", "precision=bf16"]
DOCS = [REPO / "README.md", REPO / "launch" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Examples of the docs that show an error on purpose (docs/config.md).
SHOWN_FAILING = {("method.lora_rnk=4",), ("method=lorra",)}
# Settings of documented commands that need a run dir or a launcher, not a config.
NOT_CONFIG = re.compile(r"^(hydra[./]|rerun=|resume=|experiment=|init_from=)")


def documented_commands() -> list[tuple[str, ...]]:
    """Every ``ftlab ...`` line in the docs' code blocks, sweeps expanded into their jobs."""
    commands: list[tuple[str, ...]] = []
    for doc in DOCS:
        blocks = re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), flags=re.S)
        for block in blocks:
            text = block.replace("\\\n", " ")
            for line in text.splitlines():
                match = re.match(r"^\s*(?:\$ )?ftlab (.*)", line)
                if not match:
                    continue
                args = [a for a in shlex.split(match.group(1), comments=True) if a != "-m"]
                if any("=" not in a for a in args) or any(
                    a.startswith(("rerun=", "resume=")) for a in args
                ):
                    continue  # printed output (``ftlab summary``), or needs a run dir
                args = [a for a in args if not NOT_CONFIG.match(a)]
                # A sweep: every value of every swept setting once (not the whole grid).
                # (A list or dict value, such as data.sources=[{...},{...}], is one value.)
                first = [a if a.partition("=")[2][:1] in "[{" else a.split(",")[0] for a in args]
                commands.append(tuple(first))
                for i, a in enumerate(args):
                    key, _, values = a.partition("=")
                    if values[:1] in ("[", "{"):
                        continue
                    for v in values.split(",")[1:]:
                        commands.append(tuple(first[:i] + [f"{key}={v}"] + first[i + 1 :]))
    return list(dict.fromkeys(commands))


# The GPU examples of the docs (README.md, launch/README.md, docs/*.md): the slow test below
# checks that this list holds every documented command this CPU machine refuses.
GPU_EXAMPLES = [
    ("method=qlora", "model=llama3", "parallel=tp4"),
    ("method.lora_rank=4", "parallel=sharding_stage2"),
    ("mode=plan", "device=gpu", "model=llama3", "method=lora", "parallel=tp4", "precision=bf16"),
    ("mode=export", "device=gpu", "model=llama3", "method=lora", "parallel=sharding_stage2")
    + ("precision=bf16",),
    ("parallel=tp4", "model=llama3", "method=lora", "precision=bf16"),
    # The command ftlab-import prints for the run_finetune.py argument file of docs/interop.md.
    tuple(
        "model=llama3 method=lora data=advertisegen parallel=sharding_stage1 precision=bf16 "
        "eval.generation=false "
        "train.per_device_train_batch_size=1 train.per_device_eval_batch_size=8 "
        "train.learning_rate=0.0003 train.lr_scheduler_type=linear train.warmup_steps=30 "
        "train.logging_steps=1 train.save_total_limit=1 train.recompute=true data.path=./data "
        "data.src_length=1024 data.max_length=2048 model.flash_attention=true "
        "train.max_steps=-1 train.num_train_epochs=3.0 train.eval_steps=1 "
        "train.save_steps=1".split()
    ),
    *[  # launch/README.md's two-node SLURM sweep, each swept value once
        ("launch.nnodes=2", "launch.master=slurm", "model=llama3", "parallel=dp8")
        + ("precision=bf16", method)
        for method in ("method=lora", "method=qlora")
    ],
]


@pytest.mark.slow
def test_gpu_examples_list_every_gpu_command_of_the_docs() -> None:
    found = []
    for command in documented_commands():
        if command in SHOWN_FAILING:
            continue
        run = compose_run(list(command))
        try:
            validate(run, CPU)
            gpu = run.device == "gpu"
        except ConfigError:
            gpu = True
        if gpu:
            found.append(frozenset(command))
    mission = frozenset(["mode=plan", "device=gpu", *MISSION])  # the target section's example
    assert set(found) == {frozenset(c) for c in GPU_EXAMPLES} | {mission}


@pytest.mark.parametrize("command", [tuple(MISSION), *GPU_EXAMPLES], ids=" ".join)
def test_gpu_examples_plan_and_export_on_this_cpu_machine(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    from ftlab.cli.app import execute

    composed = compose_cfg([o for o in command if not o.startswith(("mode=", "device="))])
    for mode in ("plan", "export"):
        cfg = composed.copy()
        cfg.mode, cfg.device = mode, "gpu"
        run_dir = tmp_path / mode
        out = execute(cfg, run_dir)
        assumptions = out["assumptions"]
        assert assumptions and "described, not probed" in assumptions[0], command
        if mode == "plan":
            plan = json.loads((run_dir / "plan.json").read_text())
            assert plan["device"] == "gpu" and plan["assumptions"] == assumptions
            continue
        model, _, training, _ = parse_like_run_finetune(Path(out["path"]))
        assert model.model_name_or_path == out["arguments"]["model_name_or_path"]
        assert (
            training.per_device_train_batch_size == out["arguments"]["per_device_train_batch_size"]
        )
        notes = json.loads((run_dir / "run_finetune_notes.json").read_text())
        assert [n for n in notes if n.startswith("assumed: ")] == [
            f"assumed: {a}" for a in assumptions
        ]


@pytest.mark.fast
def test_mission_command_assumes_paddlenlp_qlora_with_paddleslim() -> None:
    run = compose_run([*MISSION, "mode=plan", "device=gpu"])
    env = run_environment(run)
    assert env.described and env.device == "gpu" and env.device_count == 4
    assert env.gpu_compute_capability == (8, 0) and env.paddleslim_ops
    derived = validate(run, env)
    assert derived["quant_backend"] == "paddlenlp" and derived["world_size"] == 4
    qlora = [a for a in derived.assumptions if a.startswith("QLoRA")]
    assert qlora == [
        "QLoRA runs PaddleNLP's quantized kernels there (quant_backend=auto -> paddlenlp, nf4); "
        "nf4/fp4 need PaddleSlim's CUDA ops (paddleslim_ops) there, assumed installed "
        "(target.paddleslim_ops=true)"
    ]
    assert "4 GPU(s) per node of compute capability 8.0" in derived.assumptions[0]


@pytest.mark.fast
def test_target_settings_change_the_answers() -> None:
    # Without PaddleSlim there, tensor-parallel nf4 QLoRA has no backend on the target.
    run = compose_run([*MISSION, "mode=plan", "device=gpu", "target.paddleslim_ops=false"])
    with pytest.raises(ConfigError, match="on the target GPU machine.*PaddleSlim"):
        validate(run, target_environment(run))
    # A V100 target refuses bf16, as a probed V100 would.
    run = compose_run([*MISSION[1:], "mode=export", "device=gpu", "target.compute_capability=7.0"])
    with pytest.raises(ConfigError, match="bfloat16 needs compute capability >= 8.0"):
        validate(run, target_environment(run))
    # Fewer GPUs per node than the layout needs.
    run = compose_run(["model=llama3", "parallel=tp8", "mode=plan", "device=gpu"])
    run = dataclasses.replace(run, target=dataclasses.replace(run.target, gpus_per_node=4))
    with pytest.raises(ConfigError, match="needs 8 processes per node but this machine has 4"):
        validate(run, target_environment(run))
    with pytest.raises(ConfigError, match="target.compute_capability='eight'"):
        target_environment(
            dataclasses.replace(
                run, target=dataclasses.replace(run.target, compute_capability="eight")
            )
        )


def test_a_plan_refused_here_says_to_add_device_gpu() -> None:
    run = compose_run(["mode=export", "model=llama3", "parallel=sharding_stage2", "precision=bf16"])
    with pytest.raises(ConfigError, match=r"CPU runs compute in float32 only(.|\n)*Add device=gpu"):
        validate_for(run, CPU)
    # Settings that fail on any machine get no such hint.
    run = compose_run(["mode=export", "method.lora_rank=0"])
    with pytest.raises(ConfigError) as info:
        validate_for(run, CPU)
    assert "device=gpu" not in str(info.value)
    # Training validates against this machine, never a described one.
    assert not run_environment(compose_run(["device=cpu"])).described
