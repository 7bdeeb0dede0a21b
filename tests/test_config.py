"""Every shipped option composes and validates; every invalid case fails with its message."""

from __future__ import annotations

import pytest
from helpers import CPU, GPU8, compose_cfg, compose_run, group_options

from ftlab.cli.app import explain_composition_error
from ftlab.config.schema import RunConfig
from ftlab.errors import ConfigError
from ftlab.methods.lora import LoraMethodConfig
from ftlab.resolve.validate import validate

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

GPU_ONLY_PRECISION = {"bf16", "bf16_o1", "fp16", "fp16_o2"}
PREFERENCE_DATA = {"demo_preferences"}


@pytest.mark.parametrize("group", ["model", "method", "stage", "data", "parallel", "precision"])
def test_every_option_composes_and_validates(group: str) -> None:
    options = group_options(group)
    assert options, f"conf/{group} is empty"
    for option in options:
        extra = ["model=llama3"] if group == "parallel" else []
        if group == "data" and option in PREFERENCE_DATA:
            extra = ["stage=dpo"]  # preference data trains a preference stage
        run = compose_run([f"{group}={option}", *extra])
        assert isinstance(run, RunConfig)
        assert getattr(run, group).name == option, (group, option)
        env = CPU if validate_on_cpu(group, option) else GPU8
        derived = validate(run, env)
        assert derived["world_size"] >= 1
        assert derived["global_batch_size"] >= run.train.per_device_train_batch_size


def validate_on_cpu(group: str, option: str) -> bool:
    if group == "precision":
        return option not in GPU_ONLY_PRECISION
    if group == "parallel":
        return option in {"single", "dp2", "sharding_stage1"}
    return True


def test_defaults_and_derived_values() -> None:
    run = compose_run()
    assert (run.model.name, run.method.name, run.data.name) == (
        "stories260k",
        "lora",
        "demo_stories",
    )
    assert isinstance(run.method, LoraMethodConfig)
    derived = validate(run, CPU)
    assert derived["data_parallel_degree"] == 1
    assert derived["global_batch_size"] == run.train.per_device_train_batch_size
    assert derived["lora_alpha"] == 2 * run.method.lora_rank
    assert derived["lora_scaling"] == pytest.approx(2.0)


def test_rslora_scaling_is_derived() -> None:
    derived = validate(compose_run(["method.lora_rank=16", "method.rslora=true"]), CPU)
    assert derived["lora_scaling"] == pytest.approx(32 / 4)


def test_unknown_key_names_closest_valid_keys() -> None:
    with pytest.raises(Exception) as info:
        compose_cfg(["method.lora_rnk=4"])
    msg = explain_composition_error(info.value)
    assert "Key 'lora_rnk' not in 'LoraMethodConfig'" in msg
    assert "Closest valid keys: lora_rank" in msg
    assert "To append" not in msg


def test_misspelled_group_option_suggests() -> None:
    with pytest.raises(Exception) as info:
        compose_cfg(["method=lorra"])
    msg = explain_composition_error(info.value)
    assert msg.startswith("method=lorra: no such method option.")
    assert "Closest: method=lora." in msg
    assert "base_lora" not in msg  # schemas are not offered as options


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises(Exception) as info:
        compose_cfg(["train.max_steps=abc"])
    msg = explain_composition_error(info.value)
    assert "train.max_steps" in msg and "Integer" in msg


@pytest.mark.parametrize("precision", sorted(GPU_ONLY_PRECISION))
def test_half_precision_on_cpu_fails(precision: str) -> None:
    with pytest.raises(ConfigError, match=f"precision={precision} .*CPU runs compute in float32"):
        validate(compose_run([f"precision={precision}"]), CPU)


def test_bf16_on_pre_ampere_gpu_fails() -> None:
    from ftlab.config.environment import Environment

    v100 = Environment("gpu", 1, "3.3.1", (7, 0))
    with pytest.raises(ConfigError, match="bfloat16 needs compute capability >= 8.0.*fp16"):
        validate(compose_run(["precision=bf16"]), v100)


def test_layout_needing_more_devices_names_the_numbers() -> None:
    run = compose_run(["parallel.data=4"])
    with pytest.raises(ConfigError, match="needs 4 processes per node but this machine has 2"):
        validate(run, CPU)


def test_invalid_choice_suggests() -> None:
    with pytest.raises(ConfigError, match="data.packing='greedyy'.*Did you mean 'greedy'"):
        validate(compose_run(["data.packing=greedyy"]), CPU)


def test_max_length_beyond_model_context_fails() -> None:
    with pytest.raises(ConfigError, match="data.max_length=1024 exceeds model stories260k"):
        validate(compose_run(["data.max_length=1024"]), CPU)


def test_flash_attention_on_old_cpu_paddle_fails() -> None:
    from ftlab.config.environment import Environment

    old = Environment("cpu", 2, "3.0.0")
    with pytest.raises(ConfigError, match="model.flash_attention=true.*paddlepaddle>=3.3"):
        validate(compose_run(["model.flash_attention=true"]), old)


def test_streaming_needs_max_steps() -> None:
    with pytest.raises(ConfigError, match="data.streaming=true needs train.max_steps"):
        validate(compose_run(["data.streaming=true", "train.max_steps=-1"]), CPU)


def test_amp_without_half_dtype_fails() -> None:
    with pytest.raises(ConfigError, match="AMP needs a 16-bit dtype"):
        validate(compose_run(["precision.amp_level=O2"]), GPU8)
