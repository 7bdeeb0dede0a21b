"""``parallel=auto``: the chooser against the plan, validation, PaddleNLP's documented
layouts, the cost model's arithmetic, its refusals, the CLI and the sweep summary."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from fake_runs import make_run
from helpers import CPU, GPU8, compose_run, without_paddle_vars

from ftlab.config.environment import Environment
from ftlab.errors import ConfigError
from ftlab.methods.catalog import get_method
from ftlab.planning.advice import NoLayoutFits, no_fit_error
from ftlab.planning.auto import apply_choice, decide, resolve_auto
from ftlab.planning.candidates import BATCH, MEMORY, RULE, Candidate
from ftlab.planning.cost import PROFILES, Shape, resolve_hardware, step_time
from ftlab.planning.plan import count_parameters, layout_estimate, make_plan
from ftlab.planning.search import choose
from ftlab.record.rundir import RunDir
from ftlab.record.sweep import read_sweep, summary_rows, write_csv
from ftlab.resolve.validate import validate

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

GIB = 2**30
CPU_RAM = Environment("cpu", 2, "3.3.1", None, 23.5)
# PaddleNLP's llm/config/llama/*_argument.json for Meta-Llama-3-8B (bf16 O2, src 1024,
# max_length 2048), one process per GPU on 8 GPUs: LoRA with sharding stage 1, recompute
# and flash attention; full fine-tuning with sharding stage 2, no recompute.
LLAMA3_DOCS = {
    "lora": (
        ["method=lora", "model.flash_attention=true", "train.per_device_train_batch_size=1"],
        ["parallel=sharding_stage1", "parallel.sharding=8", "train.recompute=true"],
        8,  # global batch: 1 x 1 accumulation x 8 ranks
    ),
    "full": (
        [
            "method=full",
            "train.per_device_train_batch_size=1",
            "train.gradient_accumulation_steps=2",
        ],
        ["parallel=sharding_stage2", "parallel.sharding=8"],
        16,
    ),
}
# The evaluation batch of PaddleNLP's argument files (llm/config/qwen/*_argument.json: 8);
# ftlab's default (16) makes the evaluation pass's fp32 logits the peak at 2048 tokens.
LLAMA3 = ["model=llama3", "precision=bf16", "device=gpu", "data.src_length=1024"]
LLAMA3 += ["train.per_device_eval_batch_size=8"]
LLAMA3 += ["data.max_length=2048"]


def auto_run(*overrides: str):
    return compose_run(["parallel=auto", *overrides])


def plan_memory_gib(run, env) -> float:
    """What the plan says the run's busiest device needs, from the resolved run alone."""
    plan = make_plan(run, validate(run, env), env.device)
    mem = plan["memory_bytes"]
    return mem["needed"] / GIB


def check_decision(run, env, decision) -> None:
    """The properties every decision has, each recomputed independently of the chooser."""
    hw = decision.hardware
    for c in decision.candidates:
        if c.rank is not None:
            assert not c.kind and c.memory_gib <= c.usable_gib
        if c.kind == MEMORY:
            assert c.memory_gib > c.usable_gib
    chosen = decision.chosen
    if chosen is None:
        assert not decision.ranked
        return
    assert chosen.rank == 1 and chosen.step_seconds == min(c.step_seconds for c in decision.ranked)
    resolved = apply_choice(run, decision)
    # The resolved run is valid and the plan, asked afresh, says it fits.
    need = plan_memory_gib(resolved, env)
    usable = hw.usable_gib(chosen.nproc_per_node, run.parallel.auto.memory_margin)
    assert need == pytest.approx(chosen.memory_gib, abs=1e-3)
    assert need <= usable
    derived = validate(resolved, env)
    assert derived.global_batch_size == decision.global_batch
    assert derived.world_size == chosen.world_size


@pytest.mark.parametrize("method", ["lora", "full"])
def test_llama3_on_8_gpus_chooses_a_layout_that_fits_and_beats_paddlenlps(method: str) -> None:
    base, documented, gb = LLAMA3_DOCS[method]
    run = auto_run(*LLAMA3, *base, f"parallel.auto.global_batch_size={gb}")
    decision = decide(run, GPU8)
    check_decision(run, GPU8, decision)
    # PaddleNLP's documented layout fits under the plan too, and auto's estimate is no slower.
    docs = compose_run([*LLAMA3, *base, *documented])
    assert validate(docs, GPU8).global_batch_size == gb
    extra, _ = layout_estimate(docs, GPU8, None, [])
    assert extra["estimate"]["kind"] == ""  # fits
    assert decision.chosen.step_seconds <= extra["estimate"]["step"]["total"]
    assert extra["estimate"]["memory_gib"] == pytest.approx(plan_memory_gib(docs, GPU8), abs=1e-3)


def random_setting(rng: random.Random) -> tuple[list[str], Environment]:
    model = rng.choice(["stories260k", "llama3", "llama2", "qwen2"])
    method = rng.choice(["full", "lora", "qlora", "prefix", "vera"])
    gpu = model != "stories260k" or rng.random() < 0.5
    length = rng.choice([128, 256, 512, 2048, 4096]) if model != "stories260k" else 256
    overrides = [
        f"model={model}",
        f"method={method}",
        f"data.max_length={length}",
        f"data.src_length={length // 2}",
        f"parallel.auto.global_batch_size={rng.choice([1, 4, 6, 16, 64])}",
        f"parallel.auto.recompute={rng.choice(['choose', 'off'])}",
    ]
    if not gpu:
        return [*overrides, "device=cpu"], CPU_RAM
    per_node = rng.choice([1, 2, 4, 8])
    overrides += [
        "device=gpu",
        f"precision={rng.choice(['bf16', 'fp32'])}",
        f"launch.nnodes={rng.choice([1, 1, 2])}",
        f"launch.accelerator={rng.choice(['a100', 'a100_40g', 'h100', 'h800'])}",
        f"launch.device_memory_gib={rng.choice([16, 24, 40, 80])}",
    ]
    return overrides, Environment("gpu", per_node, "3.3.1", (9, 0))


@pytest.mark.parametrize("seed", range(8))
def test_auto_never_chooses_a_layout_the_plan_rejects(seed: int) -> None:
    overrides, env = random_setting(random.Random(seed))
    run = auto_run(*overrides)
    decision = decide(run, env)
    check_decision(run, env, decision)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8, 120))
def test_auto_never_chooses_a_layout_the_plan_rejects_many(seed: int) -> None:
    test_auto_never_chooses_a_layout_the_plan_rejects(seed)


def test_cpu_chooses_among_what_this_machine_runs() -> None:
    run = auto_run("device=cpu")
    decision = decide(run, CPU_RAM)
    check_decision(run, CPU_RAM, decision)
    runnable = {"single", "dp2", "sharding2/stage1"}
    assert {c.layout_label for c in decision.ranked} == runnable
    assert decision.chosen.layout_label in runnable
    refused = [c for c in decision.candidates if c.kind == RULE]
    assert refused and all(c.tensor > 1 or c.pipeline > 1 or c.sharding_stage >= 2 for c in refused)
    # One process per core: dp2 halves the compute, and its LoRA all-reduce is tiny.
    single = next(c for c in decision.ranked if c.layout_label == "single")
    assert decision.chosen.step_seconds < single.step_seconds


def test_the_global_batch_is_kept_and_split_over_the_data_ranks() -> None:
    run = auto_run("device=cpu", "train.per_device_train_batch_size=6")
    decision = decide(run, CPU_RAM)
    assert decision.global_batch == 6
    for c in decision.candidates:
        if c.kind == BATCH:
            assert 6 % (c.data * c.sharding)
        elif c.micro_batch:
            assert c.micro_batch * c.accumulation * c.data * c.sharding == 6
    resolved = apply_choice(run, decision)
    assert validate(resolved, CPU_RAM).global_batch_size == 6


def test_cost_model_arithmetic() -> None:
    """Compute, bubble and collectives of hand-written shapes, from the stated formulas."""
    run = compose_run(["method=full", "model=llama3", "precision=bf16", "device=gpu"])
    adapter = get_method("full").plan(run)
    counts = count_parameters(run, adapter)
    hw = resolve_hardware(run, GPU8, 8)
    a, seq = run.model.arch, 1024
    n_layer = counts.per_layer - counts.norms_and_biases_per_layer
    layer_fwd = 2 * n_layer + 4 * seq * a.hidden_size
    head = 2 * a.vocab_size * a.hidden_size
    # Forward + activation gradients (2 x forward) + weight gradients (2 x matmul params).
    per_token = a.num_hidden_layers * (2 * layer_fwd + 2 * n_layer) + 3 * head
    rate = PROFILES["a100"].tflops_16 * 1e12 * PROFILES["a100"].mfu

    def shape(**kw) -> Shape:
        base = dict(
            nproc_per_node=8,
            data=1,
            tensor=1,
            pipeline=1,
            sharding=1,
            sharding_stage=0,
            offload=False,
            sequence_parallel=False,
            recompute=0.0,
            micro_batch=2,
            accumulation=4,
            seq_len=seq,
        )
        return Shape(**{**base, **kw})

    single = step_time(run, counts, adapter, shape(nproc_per_node=1), hw)
    assert single.compute == pytest.approx(4 * 2 * seq * per_token / rate)
    assert single.data_comm == single.tensor_comm == single.bubble == 0
    rc = step_time(run, counts, adapter, shape(nproc_per_node=1, recompute=1.0), hw)
    extra = 4 * 2 * seq * a.num_hidden_layers * layer_fwd / rate
    assert rc.compute - single.compute == pytest.approx(extra)

    dp8 = step_time(run, counts, adapter, shape(data=8), hw)
    grads = counts.trainable * 2  # bf16 O2 gradients
    assert dp8.compute == pytest.approx(single.compute)  # per rank: same micro-batches
    assert dp8.data_comm == pytest.approx(2 * 7 / 8 * grads / (230e9))
    s2 = step_time(run, counts, adapter, shape(sharding=8, sharding_stage=2), hw)
    # Stage 2 reduce-scatters after each of the 4 micro-batches, then gathers once.
    assert s2.data_comm == pytest.approx((4 + 1) * 7 / 8 * grads / 230e9)

    pp4 = step_time(run, counts, adapter, shape(pipeline=4, data=2), hw)
    micro = pp4.compute / 4
    assert pp4.bubble == pytest.approx(3 * micro)  # stages - 1 idle micro-batch slots
    tp2 = step_time(run, counts, adapter, shape(tensor=2, data=4), hw)
    act = 2 * seq * a.hidden_size * 2
    reduces = a.num_hidden_layers * 4 + 1
    logits = 2 * seq * a.vocab_size * 2
    expected = 4 * (reduces * 2 * 0.5 * act + 0.5 * logits) / 230e9
    assert tp2.tensor_comm == pytest.approx(expected)
    assert tp2.compute == pytest.approx(single.compute / 2)
    # A data-parallel group that leaves the node runs at the inter-node bandwidth.
    two_nodes = step_time(run, counts, adapter, shape(data=16), hw)
    assert two_nodes.data_comm == pytest.approx(2 * 15 / 16 * grads / 22e9)


def test_profiles_and_launch_overrides() -> None:
    run = auto_run(
        "device=gpu", "launch.accelerator=h800", "launch.mfu=0.3", "launch.device_memory_gib=64"
    )
    hw = resolve_hardware(run, GPU8, 8)
    assert (hw.accelerator, hw.mfu, hw.memory_gib) == ("h800", 0.3, 64.0)
    assert hw.tflops == PROFILES["h800"].tflops_32  # fp32 run: the TF32 peak
    assert hw.sources["mfu"] == "launch.mfu" and hw.sources["intra_node_gbps"] == "profile h800"
    probed = Environment("gpu", 8, "3.3.1", (8, 0), 39.4, "NVIDIA A100-SXM4-40GB")
    detect = dataclasses.replace(run, launch=type(run.launch)())
    hw = resolve_hardware(detect, probed, 8)
    assert (hw.accelerator, hw.memory_gib) == ("a100_40g", 39.4)
    assert hw.sources["device_memory_gib"] == "probe"
    with pytest.raises(ConfigError, match="NVIDIA L40S.*no built-in cost profile"):
        resolve_hardware(detect, dataclasses.replace(probed, device_name="NVIDIA L40S"), 8)


def test_explicit_degrees_contradicting_auto_are_refused(tmp_path: Path) -> None:
    run = auto_run("parallel.tensor=2")
    with pytest.raises(ConfigError, match=r"parallel=auto with parallel.tensor=2"):
        resolve_auto(run, CPU_RAM, RunDir(tmp_path))
    auto = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, tensor=1))
    # Named on the command line, even at the default value.
    with pytest.raises(ConfigError, match=r"parallel=auto with parallel.pipeline=1"):
        resolve_auto(auto, CPU_RAM, RunDir(tmp_path), overrides=["parallel.pipeline=1"])
    recompute = dataclasses.replace(auto, train=dataclasses.replace(auto.train, recompute=True))
    with pytest.raises(ConfigError, match="train.recompute=true with parallel=auto"):
        resolve_auto(recompute, CPU_RAM, RunDir(tmp_path))
    assert not (tmp_path / "auto_layout.json").exists()  # refused before choosing
    named = compose_run(["parallel.auto.memory_margin=0.2", "launch.mfu=0.5"])
    with pytest.raises(ConfigError, match="parallel.auto.\\* settings apply to parallel=auto"):
        validate(named, CPU)
    named = dataclasses.replace(
        named, parallel=dataclasses.replace(named.parallel, auto=auto.parallel.auto)
    )
    with pytest.raises(ConfigError, match="launch.mfu describes the devices"):
        validate(named, CPU)
    validate(dataclasses.replace(named, mode="plan"), CPU)  # a plan reads it


COMBINATIONS = [
    (dict(pipeline=2, sharding=2, sharding_stage=2), "stage 1 only"),
    (dict(tensor=2, sharding=2, sharding_stage=3), "stage 1 or 2"),
    (dict(sequence_parallel=True), "needs tensor parallelism"),
    (dict(sharding=2, sharding_stage=1, offload=True), "needs sharding stage 2 or 3"),
    (dict(sharding=2, sharding_stage=2, offload=True), "needs pure 16-bit"),
    (dict(sharding=8, sharding_stage=2, offload=True, nproc_per_node=16), "Paddle offloads pure"),
    (dict(sharding_stage=1), "shards over one rank"),
    (dict(sharding=2), "without parallel.sharding_stage"),
]


def test_combinations_paddlenlp_refuses_fail_validation() -> None:
    run = compose_run(["model=llama3", "method=full", "device=gpu"])
    sixteen = dataclasses.replace(GPU8, device_count=16)
    for degrees, message in COMBINATIONS:
        bad = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, **degrees))
        if "pure sharding" in message or "offloads pure" in message:
            bad = dataclasses.replace(bad, precision=compose_run(["precision=bf16"]).precision)
        with pytest.raises(ConfigError, match=message):
            validate(bad, sixteen)


def test_offload_moves_optimizer_states_off_the_device() -> None:
    run = compose_run(["model=llama3", "method=full", "precision=bf16", "device=gpu"])
    mem = {}
    for name, stage, offload in [
        ("s2", 2, False),
        ("s2o", 2, True),
        ("s3", 3, False),
        ("s3o", 3, True),
    ]:
        par = dataclasses.replace(run.parallel, sharding=8, sharding_stage=stage, offload=offload)
        sharded = dataclasses.replace(run, parallel=par)
        mem[name] = make_plan(sharded, validate(sharded, GPU8), "gpu")["memory_bytes"]
    assert mem["s2o"]["optimizer"] == 0 and mem["s2"]["optimizer"] > 0
    assert mem["s2o"]["weights"] == mem["s2"]["weights"]
    layer = count_parameters(run).per_layer
    head = run.model.arch.vocab_size * run.model.arch.hidden_size
    assert mem["s3o"]["weights"] == pytest.approx(max(2 * layer, head) * 2)  # bf16
    assert mem["s3o"]["weights"] < mem["s3"]["weights"]


def test_nothing_fits_lists_the_closest_and_what_would_fit() -> None:
    run = auto_run(
        "model=llama3",
        "method=full",
        "precision=bf16",
        "device=gpu",
        "data.max_length=4096",
        "data.src_length=1024",
        "launch.device_memory_gib=24",
        "parallel.nproc_per_node=1",
        # An evaluation batch of 1: at 16 x 4096 tokens the evaluation pass's fp32 logits
        # (78 GiB) fit no number of devices, and this test is about the training layout.
        "train.per_device_eval_batch_size=1",
    )
    env = Environment("gpu", 1, "3.3.1", (9, 0))
    decision = decide(run, env)
    assert decision.chosen is None
    err = no_fit_error(run, env, decision)
    assert isinstance(err, NoLayoutFits)
    text = str(err)
    closest = decision.closest[0]
    assert f"needs {closest.memory_gib:.1f} GiB per device, has {closest.usable_gib:.1f}" in text
    assert err.needs_gib == closest.memory_gib and err.has_gib == closest.usable_gib
    assert "Closest candidates:" in text and "What would make one fit:" in text
    assert "more devices: " in text and "(launch.nnodes=" in text or "nproc_per_node=" in text
    assert "QLoRA: method=qlora (nf4) fits" in text
    assert "more memory: devices with at least" in text
    # Each suggestion was checked by choosing again; the QLoRA one really fits.
    qlora = auto_run(
        "model=llama3",
        "method=qlora",
        "precision=bf16",
        "device=gpu",
        "data.max_length=4096",
        "data.src_length=1024",
        "launch.device_memory_gib=24",
        "parallel.nproc_per_node=1",
        # An evaluation batch of 1: at 16 x 4096 tokens the evaluation pass's fp32 logits
        # (78 GiB) fit no number of devices, and this test is about the training layout.
        "train.per_device_eval_batch_size=1",
    )
    assert decide(qlora, env).chosen is not None


def test_decision_is_recorded_and_reused_by_workers(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    run = auto_run("device=cpu")
    resolved, decision = resolve_auto(run, CPU_RAM, run_dir, quiet=True)
    recorded = json.loads((run_dir / "auto_layout.json").read_text())
    assert recorded["chosen_label"] == decision.chosen.label
    assert recorded["counts"]["ranked"] == len(decision.ranked)
    # A worker (or a resume) on a machine that would choose differently keeps the record.
    one_core = Environment("cpu", 1, "3.3.1", None, 23.5)
    again, _ = resolve_auto(run, one_core, run_dir, reuse=True, quiet=True)
    assert again.parallel == resolved.parallel and again.train == resolved.train


def test_plan_sweep_prints_the_ranking_and_marks_what_does_not_fit(tmp_path: Path) -> None:
    """One ``ftlab -m mode=plan`` sweep: two device sizes, one too small for any layout."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftlab.cli.app",
            "-m",
            "mode=plan",
            "parallel=auto",
            "device=gpu",
            "model=llama3",
            "method=full",
            "precision=bf16",
            "launch.device_memory_gib=80,2",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ftlab parallel=auto" in out and "chosen" in out and "not runnable" in out
    fits, small = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    plan = json.loads((fits / "plan.json").read_text())
    chosen = plan["auto"]["chosen"]
    assert plan["layout"]["tensor"] == chosen["tensor"]
    assert plan["memory_bytes"]["needed"] / GIB == pytest.approx(chosen["memory_gib"], abs=1e-3)
    assert chosen["memory_gib"] <= chosen["usable_gib"]
    no_fit = json.loads((small / "auto_layout.json").read_text())
    assert no_fit["chosen"] is None and no_fit["does_not_fit"].startswith("does not fit: needs")
    md = (sweep_dir / "summary.md").read_text()
    assert "| does not fit |" in md and no_fit["does_not_fit"] in md
    assert plan["auto"]["chosen_label"] in md


def test_sweep_summary_marks_jobs_that_fit_no_layout(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    for num, (memory, fits) in enumerate([(80, True), (8, False)]):
        over = ["parallel=auto", f"launch.device_memory_gib={memory}"]
        error = None if fits else ("NoLayoutFits", "parallel=auto: no layout ...")
        run_dir = make_run(
            sweep_dir / f"{num}_x",
            over,
            f"2026-01-04T08:00:0{num}+00:00",
            job_num=num,
            status="completed" if fits else "failed",
            error=error,
            hydra_dir=False,
        )
        record = {"chosen_label": "dp8 on 8 device(s)" if fits else None}
        record["does_not_fit"] = (
            None if fits else "does not fit: needs 21.3 GiB per device, has 6.2"
        )
        (run_dir / "auto_layout.json").write_text(json.dumps(record))
    rows = summary_rows(read_sweep(sweep_dir))
    assert [(r["status"], r["layout"]) for r in rows] == [
        ("completed", "dp8 on 8 device(s)"),
        ("does not fit", "does not fit: needs 21.3 GiB per device, has 6.2"),
    ]
    write_csv(rows, read_sweep(sweep_dir), tmp_path / "summary.csv")
    assert "layout" in (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")


def test_a_candidate_records_everything_the_table_shows() -> None:
    decision = choose(
        auto_run("device=cpu"), CPU_RAM, resolve_hardware(auto_run("device=cpu"), CPU_RAM, 2)
    )
    table = decision.to_dict()
    assert table["counts"]["candidates"] == len(table["candidates"]) == len(decision.candidates)
    first = table["candidates"][0]
    assert first["status"] == "chosen" and first["reason"] == "fastest that fits"
    assert set(first["step"]) >= {"compute", "data_comm", "bubble", "total"}
    assert math.isclose(
        first["step"]["total"],
        sum(v for k, v in first["step"].items() if k != "total"),
        rel_tol=1e-5,
    )
    again = type(decision).from_dict(json.loads(json.dumps(table)))
    assert [c.label for c in again.ranked] == [c.label for c in decision.ranked]
    assert isinstance(again.candidates[0], Candidate)


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_auto_sweep_trains_the_fitting_job_and_launches_nothing_for_the_other(
    tmp_path: Path,
) -> None:
    """The shipped model on this machine's 2 processes: auto picks single, dp2 or sharding
    stage 1 and the run completes; a job whose memory fits no layout stops before launching."""
    sweep_dir = tmp_path / "sweep"
    env = without_paddle_vars(os.environ)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftlab.cli.app",
            "-m",
            "parallel=auto",
            "device=cpu",
            "train.max_steps=3",
            "train.logging_steps=1",
            "eval.demo_metric=false",
            "launch.device_memory_gib=23,0.5",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    # A training job that could not start is a failed job: the sweep exits 1 and says so.
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 of 2 jobs failed: job 1 (NoLayoutFits" in proc.stderr, proc.stderr[-3000:]
    ran, small = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    decision = json.loads((ran / "auto_layout.json").read_text())
    chosen = decision["chosen"]
    layout = Candidate(**chosen).layout_label
    assert layout in {"single", "dp2", "sharding2/stage1"}
    assert json.loads((ran / "status.json").read_text())["status"] == "completed"
    summary = json.loads((ran / "summary.json").read_text())
    assert summary["derived"]["auto_layout"] == decision["chosen_label"]
    assert summary["derived"]["world_size"] == chosen["nproc_per_node"]
    resolved = (ran / "resolved_config.yaml").read_text()
    assert f"per_device_train_batch_size: {chosen['micro_batch']}" in resolved
    assert (ran / "logs").exists() == (chosen["nproc_per_node"] > 1)
    status = json.loads((small / "status.json").read_text())
    assert status["status"] == "failed" and status["error_type"] == "NoLayoutFits"
    assert not (small / "logs").exists() and not (small / "checkpoints").exists()
    md = (sweep_dir / "summary.md").read_text()
    assert decision["chosen_label"] in md and "| does not fit |" in md
    assert json.loads((small / "auto_layout.json").read_text())["does_not_fit"] in md


def test_recompute_granularities_are_candidates_with_their_costs() -> None:
    """Each ``train.recompute_granularity`` is a choice: it writes its settings, the plan
    keeps what it keeps, and the cost model reruns its share of a layer."""
    from ftlab.config.schema import AutoLayoutSettings
    from ftlab.planning.candidates import recompute_choices

    # Evaluation batch 1: the training activations, not the evaluation pass, set the peak.
    run = auto_run(
        *LLAMA3,
        "method=full",
        "parallel.auto.global_batch_size=16",
        "train.per_device_eval_batch_size=1",
    )
    choices = {c.label: c for c in recompute_choices(AutoLayoutSettings())}
    assert list(choices) == ["off", "full", "full_attn", "core_attn"]
    shares = {k: c.shares(run) for k, c in choices.items()}
    assert shares["off"] == (0.0, 0.0) and shares["full"] == (1.0, 1.0)
    assert 0 < shares["core_attn"][0] < shares["full_attn"][0] < 1
    assert shares["full_attn"][1] == 0.5 and shares["core_attn"][1] == 0.0
    decision = decide(run, GPU8)
    check_decision(run, GPU8, decision)
    # The same layout and batch split under each granularity: memory falls and compute
    # rises with what is recomputed.
    groups: dict[tuple, dict[str, object]] = {}
    for c in decision.candidates:
        if c.step is not None:
            groups.setdefault((c.layout_label, c.micro_batch), {})[c.recompute] = c
    pairs = [g for g in groups.values() if {"full", "full_attn", "core_attn"} <= set(g)]
    assert pairs, sorted(groups)[:5]
    for g in pairs:
        assert g["full"].memory_gib < g["full_attn"].memory_gib < g["core_attn"].memory_gib
        assert g["full"].step["compute"] > g["full_attn"].step["compute"]
        assert g["full_attn"].step["compute"] > g["core_attn"].step["compute"]
