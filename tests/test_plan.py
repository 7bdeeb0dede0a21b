"""Plan mode: parameter counts, the per-device memory model and its splits, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CPU, GPU8, compose_run

from ftlab.errors import ConfigError
from ftlab.methods.qlora import quantized_bytes_per_param
from ftlab.planning.plan import (
    MIB,
    count_parameters,
    estimate_memory,
    layout,
    make_plan,
)
from ftlab.resolve.validate import validate

STORIES_PARAMS = 260_032  # what PaddleNLP's model.parameters() holds (tied embedding)
LLAMA3_8B_PARAMS = 8_030_261_248


def plan_for(overrides: list[str], env=CPU) -> dict:
    run = compose_run(overrides)
    return make_plan(run, validate(run, env), env.device)


@pytest.mark.fast
def test_counts_match_the_shipped_model_and_llama3() -> None:
    assert count_parameters(compose_run(["method=full"])).total == STORIES_PARAMS
    lora = count_parameters(compose_run(["method=lora"]))
    assert (lora.trainable, lora.total) == (46_240, STORIES_PARAMS + 46_240)  # as trained
    big = count_parameters(compose_run(["method=full", "model=llama3"]))
    assert big.total == LLAMA3_8B_PARAMS
    big_lora = count_parameters(compose_run(["method=lora", "model=llama3"]))
    assert big_lora.trainable == 20_971_520  # rank 8 on all seven projections


@pytest.mark.fast
def test_lora_targets_and_variants_change_trainable_counts() -> None:
    qv = count_parameters(compose_run(["method=lora", "method.target_modules=[.*q_proj,.*v_proj]"]))
    # 5 layers x 8 x ((64 + 64) + (64 + 32))
    assert qv.trainable == 5 * 8 * (128 + 96) and qv.targets == ["q_proj", "v_proj"]
    mixer = count_parameters(compose_run(["method=lora", "method.lora_use_mixer=true"]))
    assert mixer.trainable == 46_240 + 5 * 7 * 64
    with pytest.raises(ConfigError, match="match no linear layer"):
        count_parameters(compose_run(["method=lora", "method.target_modules=[.*nothing]"]))


@pytest.mark.fast
def test_qlora_base_bytes() -> None:
    run = compose_run(["method=qlora", "model=llama3"])
    assert quantized_bytes_per_param(run.method) == pytest.approx(0.5 + 4 / 64)
    dq = compose_run(["method=qlora", "method.double_quant=true"]).method
    assert quantized_bytes_per_param(dq) == pytest.approx(0.5 + (1 + 8 / 256) / 64)
    i8 = compose_run(["method=qlora", "method.quant_algo=int8"]).method
    assert quantized_bytes_per_param(i8) == pytest.approx(1 + 4 / 64)
    plan = plan_for(["method=qlora", "model=llama3", "device=gpu"], GPU8)
    counts = count_parameters(run)
    # Linears quantized, embedding/head/norms fp32, LoRA fp32.
    float_params = LLAMA3_8B_PARAMS - counts.quantized
    expected = counts.quantized * (0.5 + 4 / 64) + float_params * 4 + counts.adapter * 4
    assert plan["memory_bytes"]["weights"] == pytest.approx(expected)


@pytest.mark.fast
def test_full_fp32_and_bf16_o2_bytes_per_parameter() -> None:
    mem = plan_for(["method=full"])["memory_bytes"]
    p = STORIES_PARAMS
    assert (mem["weights"], mem["gradients"], mem["optimizer"]) == (4 * p, 4 * p, 8 * p)
    mem16 = plan_for(["method=full", "model=llama3", "precision=bf16", "device=gpu"], GPU8)[
        "memory_bytes"
    ]
    p = LLAMA3_8B_PARAMS
    assert (mem16["weights"], mem16["gradients"], mem16["optimizer"]) == (2 * p, 2 * p, 12 * p)


@pytest.mark.fast
@pytest.mark.parametrize(
    "parallel,weights,grads,optim",
    [
        ("sharding_stage1", 1, 1, 2),
        ("sharding_stage2", 1, 2, 2),
        ("sharding_stage3", 2, 2, 2),
    ],
)
def test_sharding_stages_divide_states(parallel: str, weights: int, grads: int, optim: int) -> None:
    base = plan_for(["method=full", "model=llama3", "device=gpu"], GPU8)["memory_bytes"]
    mem = plan_for(["method=full", "model=llama3", "device=gpu", f"parallel={parallel}"], GPU8)[
        "memory_bytes"
    ]
    assert mem["weights"] == pytest.approx(base["weights"] / weights)
    assert mem["gradients"] == pytest.approx(base["gradients"] / grads)
    assert mem["optimizer"] == pytest.approx(base["optimizer"] / optim)


@pytest.mark.fast
def test_tensor_and_pipeline_splits() -> None:
    run = compose_run(["method=full", "model=llama3", "parallel=tp4", "device=gpu"])
    counts = count_parameters(run)
    mem = estimate_memory(run, counts, layout(run, validate(run, GPU8)), "gpu")
    a = run.model.arch
    norms = a.num_hidden_layers * 2 * a.hidden_size + a.hidden_size
    assert mem.weights == pytest.approx(((LLAMA3_8B_PARAMS - norms) / 4 + norms) * 4)
    pp = plan_for(["method=full", "model=llama3", "parallel=pp2", "device=gpu"], GPU8)
    single = plan_for(["method=full", "model=llama3", "device=gpu"], GPU8)
    per_layer = count_parameters(run).per_layer
    # The busiest stage: 16 layers + the embedding (or the LM head, the same size).
    expected = (16 * per_layer + a.vocab_size * a.hidden_size + a.hidden_size) * 4
    assert pp["memory_bytes"]["weights"] == pytest.approx(expected, rel=1e-6)
    assert pp["memory_bytes"]["weights"] < single["memory_bytes"]["weights"] / 1.9


@pytest.mark.fast
def test_recompute_and_flash_attention_shrink_activations() -> None:
    plain = plan_for(["method=lora"])["memory_bytes"]
    assert plain["activations_recompute"] < plain["activations"]
    rc = plan_for(["method=lora", "train.recompute=true"])["memory_bytes"]
    assert rc["in_use"] == rc["total_recompute"] and plain["in_use"] == plain["total"]
    # GPU flash attention keeps no scores; Paddle's CPU flash attention (its math kernel)
    # keeps exactly what eager attention keeps (measured with the host allocator).
    gpu = ["method=lora", "device=gpu"]
    eager_gpu = plan_for(gpu, GPU8)["memory_bytes"]
    flash_gpu = plan_for([*gpu, "model.flash_attention=true"], GPU8)["memory_bytes"]
    assert flash_gpu["activations"] < eager_gpu["activations"]
    flash_cpu = plan_for(["method=lora", "model.flash_attention=true"])["memory_bytes"]
    assert flash_cpu["activations"] == plain["activations"]


@pytest.mark.fast
@pytest.mark.parametrize(
    "method, trainable, added_frozen",
    [
        # The trainable counts ``make bench-methods`` measured on the live models.
        ("prefix", 5_120, 0),
        ("vera", 5_240, 369_920),  # VeRA's frozen A, B: rank 64 x (in + out) per layer
        ("lokr", 8_840, 0),
        ("reft", 2_580, 0),
    ],
)
def test_plan_counts_every_method(method: str, trainable: int, added_frozen: int) -> None:
    counts = count_parameters(compose_run([f"method={method}"]))
    assert counts.trainable == trainable
    assert counts.total == STORIES_PARAMS + trainable + added_frozen
    plan = plan_for([f"method={method}"])
    assert plan["parameters"]["trainable"] == trainable and plan["method"]["name"] == method


@pytest.mark.parametrize("fast", [True, False], ids=["fast-layers", "paddlenlp-layers"])
def test_activation_model_matches_paddle_allocator(tmp_path: Path, fast: bool) -> None:
    """The fitted per-token activation terms against Paddle's own byte count (fp32, CPU),
    with the CPU fast path's layers (what an ftlab run loads) and with PaddleNLP's."""
    import paddle
    import paddle.base.core as core
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models.cpu_layers import install_cpu_layers

    # The shipped model's shapes with 2 layers: a directory whose config.json says so.
    a = compose_run().model.arch
    config = LlamaConfig(
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        vocab_size=a.vocab_size,
        max_position_embeddings=a.max_position_embeddings,
    )
    config.save_pretrained(str(tmp_path))
    overrides = [
        "method=full",
        f"model.name_or_path={tmp_path}",
        "data.max_length=128",
        "data.src_length=64",
        "train.per_device_train_batch_size=4",
        f"launch.cpu_fast_path={str(fast).lower()}",
    ]
    run = compose_run(overrides)
    a = run.model.arch
    assert a.num_hidden_layers == 2
    paddle.seed(0)
    model = LlamaForCausalLM(config)
    if fast:
        assert install_cpu_layers(model) == 5
    ids = paddle.randint(0, a.vocab_size, [4, 128])
    mask = paddle.ones([4, 128], dtype="int64")  # ftlab's collator always passes one
    before = core.host_memory_stat_current_value("Allocated", 0)
    loss = model(input_ids=ids, labels=ids, attention_mask=mask)[0]
    saved = core.host_memory_stat_current_value("Allocated", 0) - before
    del loss
    mem = estimate_memory(run, count_parameters(run), layout(run, validate(run, CPU)), "cpu")
    # The plan adds one transient (attention scores or logits gradient) to what is saved.
    transient = max(a.num_attention_heads * 128, a.vocab_size) * 4 * 128 * 4
    assert mem.activations - transient == pytest.approx(saved, rel=0.05)


@pytest.mark.fast
def test_cli_writes_plan_json_for_a_gpu_layout_on_any_machine(tmp_path: Path) -> None:
    run_dir = tmp_path / "plan"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ftlab.cli.app",
            "mode=plan",
            "device=gpu",
            "model=llama3",
            "method=lora",
            "parallel=tp2",
            "precision=bf16",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["layout"]["tensor"] == 2 and plan["layout"]["world_size"] == 2
    assert plan["device"] == "gpu" and plan["memory_mib"]["estimated_rss"] is None
    assert plan["memory_mib"]["weights"] == pytest.approx(
        plan["memory_bytes"]["weights"] / MIB, abs=0.1
    )
    assert "ftlab plan" in proc.stdout and "optimizer (AdamW)" in proc.stdout
    assert not (run_dir / "checkpoints").exists()  # nothing trained, nothing loaded


# ------------------------------------------------- optimizer state, recompute, overhead


@pytest.mark.fast
def test_optimizer_state_follows_the_optimizer() -> None:
    p = STORIES_PARAMS
    for optim, per_param in (
        ("adamw", 8),
        ("adamw_custom", 8),
        ("adamw_16bit_moment", 8),  # fp32 parameters keep fp32 moments in PaddleNLP
        ("adamw_mini", 4),  # the second moment is one number per tensor
    ):
        mem = plan_for(["method=full", f"train.optim={optim}"])["memory_bytes"]
        assert mem["optimizer"] == per_param * p, optim
    bf16 = ["method=full", "model=llama3", "precision=bf16", "device=gpu"]
    p = LLAMA3_8B_PARAMS
    mem = plan_for([*bf16, "train.optim=adamw_16bit_moment"], GPU8)["memory_bytes"]
    assert mem["optimizer"] == (2 + 2 + 4) * p  # bf16 moments + fp32 master weights
    plain = plan_for(bf16, GPU8)["memory_bytes"]
    off = plan_for([*bf16, "train.offload_optim=true"], GPU8)["memory_bytes"]
    assert off["optimizer"] == plain["optimizer"]
    assert off["total"] == pytest.approx(
        plain["attention_masks"]
        + plain["weights"]
        + plain["gradients"]
        + max(plain["activations"], plain["optimizer"])
    )


@pytest.mark.fast
def test_recompute_granularities_order_and_layers() -> None:
    def act_rc(*extra: str) -> float:
        overrides = ["method=full", "train.recompute=true", *extra]
        return plan_for(overrides)["memory_bytes"]["activations_recompute"]

    full, full_attn, core = (
        act_rc(f"train.recompute_granularity={g}") for g in ("full", "full_attn", "core_attn")
    )
    plain = plan_for(["method=full"])["memory_bytes"]["activations"]
    assert full < full_attn < core < plain
    one = act_rc("train.no_recompute_layers=[2]")
    two = act_rc("train.no_recompute_layers=[2,3]")
    assert full < one < two and two - one == pytest.approx(one - full)
    flash = ["model.flash_attention=true"]
    assert act_rc(*flash, "train.refined_recompute='flash_attn:-1'") > act_rc(*flash)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-layers", "paddlenlp-layers"])
@pytest.mark.parametrize("granularity", ["full", "full_attn", "core_attn"])
def test_recompute_terms_match_paddle_allocator(granularity: str, fast: bool) -> None:
    """What a recomputed layer keeps for backward, per the plan, against Paddle's own byte
    count: (3 layers - 1 layer) / 2 of the forward's saved bytes (fp32, CPU), with and
    without the CPU fast path's layers."""
    import paddle
    import paddle.base.core as core
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from ftlab.models.cpu_layers import install_cpu_layers

    base = [
        "method=full",
        "data.max_length=128",
        "data.src_length=64",
        "train.per_device_train_batch_size=4",
        "train.recompute=true",
        f"train.recompute_granularity={granularity}",
        f"launch.cpu_fast_path={str(fast).lower()}",
    ]

    def saved(layers: int) -> int:
        a = compose_run(base).model.arch
        config = LlamaConfig(
            hidden_size=a.hidden_size,
            intermediate_size=a.intermediate_size,
            num_hidden_layers=layers,
            num_attention_heads=a.num_attention_heads,
            num_key_value_heads=a.num_key_value_heads,
            vocab_size=a.vocab_size,
            max_position_embeddings=a.max_position_embeddings,
            recompute=True,
            recompute_granularity=granularity,
        )
        paddle.seed(0)
        model = LlamaForCausalLM(config)
        if fast:
            install_cpu_layers(model)
        model.train()
        model.recompute_enable()  # what PaddleNLP's Trainer does for recompute=true
        ids = paddle.randint(0, a.vocab_size, [4, 128])
        mask = paddle.ones([4, 128], dtype="int64")
        before = core.host_memory_stat_current_value("Allocated", 0)
        loss = model(input_ids=ids, labels=ids, attention_mask=mask)[0]
        out = core.host_memory_stat_current_value("Allocated", 0) - before
        del loss
        return out

    def planned(layers: int) -> float:
        # A hypothetical depth: a hub-style name with the shipped numbers, so the shipped
        # config.json (which fixes the depth) is not read.
        a = compose_run(base).model.arch
        hypothetical = [
            "model.name_or_path=hypothetical/stories260k",
            "model.family=llama",
            *(f"model.arch.{k}={v}" for k, v in vars(a).items() if v is not None),
        ]
        plan = plan_for([*base, *hypothetical, f"model.arch.num_hidden_layers={layers}"])
        return plan["memory_bytes"]["activations_recompute"]

    per_layer_measured = (saved(3) - saved(1)) / 2
    per_layer_planned = (planned(3) - planned(1)) / 2
    assert per_layer_planned == pytest.approx(per_layer_measured, rel=0.05)
