"""Cross-group validation, run once before any model or data is loaded.

Every check raises ``ConfigError`` with a message that names the setting, says why it
cannot work, and what to do instead. Nothing is reset silently: values ftlab computes
(data-parallel degree, global batch, LoRA alpha, ...) are returned as ``derived`` and
written into the run's resolved config.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, fields
from typing import Any

from ftlab.config.schema import LoraMethodConfig, QLoraMethodConfig, RunConfig
from ftlab.errors import ConfigError

# Allowed values of the string-typed settings. Kept as plain strings (not Enums) so YAML
# and overrides stay readable; checked here with "did you mean" suggestions.
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("train", "plan", "export"),
    "device": ("auto", "cpu", "gpu"),
    "model.family": ("llama", "qwen2"),
    "data.format": ("auto", "src_tgt", "alpaca", "messages"),
    "data.overlong": ("truncate", "drop", "error"),
    "data.packing": ("none", "zero_padding", "greedy"),
    "data.on_bad_record": ("error", "skip"),
    "precision.dtype": ("float32", "bfloat16", "float16"),
    "precision.amp_level": ("O0", "O1", "O2"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup"),
    "method.quant_algo": ("nf4", "fp4", "int8", "int4"),
    "method.quant_backend": ("auto", "paddlenlp", "ftlab"),
}


@dataclass(frozen=True)
class Environment:
    """What this machine offers, probed once (see ``probe_environment``)."""

    device: str  # cpu | gpu
    device_count: int  # GPUs, or CPU cores for gloo processes
    paddle_version: str
    gpu_compute_capability: tuple[int, int] | None = None


def probe_environment(requested: str = "auto") -> Environment:
    import paddle

    has_gpu = paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if requested == "gpu" and not has_gpu:
        raise ConfigError(
            "device=gpu: no CUDA device is visible to PaddlePaddle (CPU build, or "
            "CUDA_VISIBLE_DEVICES empty). Use device=cpu or device=auto, or install "
            "paddlepaddle-gpu (see README)."
        )
    if has_gpu and requested != "cpu":
        cap = paddle.device.cuda.get_device_capability()
        return Environment("gpu", paddle.device.cuda.device_count(), paddle.__version__, cap)
    return Environment("cpu", os.cpu_count() or 1, paddle.__version__)


def _lookup(run: RunConfig, dotted: str) -> Any:
    obj: Any = run
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def suggest(value: str, choices: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=2, cutoff=0.5)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def check_choices(run: RunConfig) -> None:
    for key, choices in CHOICES.items():
        value = _lookup(run, key)
        if value is not None and value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not a valid choice; choose one of "
                f"{', '.join(choices)}.{suggest(str(value), choices)}"
            )


def check_precision(run: RunConfig, env: Environment) -> None:
    p = run.precision
    if p.dtype == "float32" and p.amp_level != "O0":
        raise ConfigError(
            f"precision.amp_level={p.amp_level} with precision.dtype=float32: AMP needs a "
            "16-bit dtype. Use precision=bf16 or precision=fp16, or amp_level=O0."
        )
    if p.dtype != "float32" and p.amp_level == "O0":
        raise ConfigError(
            f"precision.dtype={p.dtype} with amp_level=O0: choose O1 (mixed) or O2 (pure)."
        )
    if p.dtype == "float32":
        return
    if env.device == "cpu":
        raise ConfigError(
            f"precision={p.name} ({p.dtype}): CPU runs compute in float32 only. "
            "PaddlePaddle silently ignores bf16 AMP on CPU and crashes on fp16. "
            "Use precision=fp32 on CPU, or run on a GPU."
        )
    if p.dtype == "bfloat16" and env.gpu_compute_capability and env.gpu_compute_capability < (8, 0):
        cap = ".".join(map(str, env.gpu_compute_capability))
        raise ConfigError(
            f"precision={p.name}: bfloat16 needs compute capability >= 8.0 (Ampere); this "
            f"GPU has {cap}. Use precision=fp16 instead."
        )


def check_model(run: RunConfig, env: Environment) -> None:
    m, d = run.model, run.data
    if d.max_length > m.arch.max_position_embeddings:
        raise ConfigError(
            f"data.max_length={d.max_length} exceeds model {m.name}'s context of "
            f"{m.arch.max_position_embeddings} tokens (model.arch.max_position_embeddings). "
            f"Lower data.max_length."
        )
    if d.src_length >= d.max_length:
        raise ConfigError(
            f"data.src_length={d.src_length} must be below data.max_length={d.max_length}: "
            "no room would be left for the target."
        )
    if m.flash_attention and env.device == "cpu" and env.paddle_version.startswith("3.0"):
        raise ConfigError(
            f"model.flash_attention=true: PaddlePaddle {env.paddle_version} has no CPU flash "
            "attention kernel. Set model.flash_attention=false, or use paddlepaddle>=3.3."
        )


def check_method(run: RunConfig, env: Environment) -> None:
    m = run.method
    if isinstance(m, LoraMethodConfig) and m.lora_rank < 1:
        raise ConfigError(f"method.lora_rank={m.lora_rank}: the rank must be >= 1.")
    # Every method that adapts chosen linear layers (LoRA family, LoKr, VeRA) names them in
    # ``method.target_modules``, falling back to the model family's patterns.
    if any(f.name == "target_modules" for f in fields(m)) and not (
        m.target_modules or run.model.lora_target_modules
    ):
        raise ConfigError(
            f"method={m.name}: no target modules. Set method.target_modules or "
            f"model.lora_target_modules (regexes such as '.*q_proj')."
        )
    if isinstance(m, QLoraMethodConfig) and m.quant_backend == "paddlenlp" and env.device == "cpu":
        raise ConfigError(
            f"method.quant_backend=paddlenlp with quant_algo={m.quant_algo}: PaddleNLP's "
            "quantized kernels need a GPU (nf4/fp4 also need PaddleSlim's CUDA ops). "
            "Use method.quant_backend=ftlab (or auto), which runs on any device."
        )
    if m.neftune_noise_alpha < 0:
        raise ConfigError(
            f"method.neftune_noise_alpha={m.neftune_noise_alpha}: must be >= 0 (0 disables)."
        )


def check_parallel(run: RunConfig, env: Environment) -> dict[str, Any]:
    """Check the layout against the devices; return the derived degrees."""
    p, launch = run.parallel, run.launch
    model_parallel = p.tensor * p.pipeline * p.sharding
    nproc = p.nproc_per_node or (model_parallel * (p.data or 1))
    world = nproc * launch.nnodes
    if world % model_parallel:
        raise ConfigError(
            f"parallel={p.name}: world size {world} (nnodes {launch.nnodes} x nproc_per_node "
            f"{nproc}) is not a multiple of tensor {p.tensor} x pipeline {p.pipeline} x "
            f"sharding {p.sharding} = {model_parallel}."
        )
    dp = world // model_parallel
    if p.data is not None and p.data != dp:
        raise ConfigError(
            f"parallel.data={p.data} does not match world size {world} / (tensor x pipeline x "
            f"sharding = {model_parallel}) = {dp}. Leave parallel.data unset to derive it."
        )
    if nproc > env.device_count:
        unit = "GPUs" if env.device == "gpu" else "CPU cores (one gloo process each)"
        raise ConfigError(
            f"parallel={p.name} needs {nproc} processes per node but this machine has "
            f"{env.device_count} {unit}. Use a smaller layout (e.g. parallel=single) or more "
            "devices."
        )
    if p.tensor > 1 and (
        run.model.arch.num_attention_heads % p.tensor
        or run.model.arch.num_key_value_heads % p.tensor
    ):
        raise ConfigError(
            f"parallel.tensor={p.tensor} must divide the attention heads "
            f"({run.model.arch.num_attention_heads}) and key/value heads "
            f"({run.model.arch.num_key_value_heads}) of model {run.model.name}."
        )
    # PaddleNLP's pipeline models split evenly when the stages divide the layers, and
    # otherwise spread embedding, layers, norm and head uniformly; each stage needs a layer.
    if p.pipeline > 1 and run.model.arch.num_hidden_layers < p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} exceeds model {run.model.name}'s "
            f"{run.model.arch.num_hidden_layers} layers: every stage needs at least one. "
            "Use fewer pipeline stages."
        )
    if env.device == "cpu" and p.cpu_emulation:
        from ftlab.emulation import check_emulation

        check_emulation(run)  # refuses the layouts the CPU emulation cannot run
    elif env.device == "cpu" and (p.tensor > 1 or p.pipeline > 1 or p.sharding_stage in (2, 3)):
        raise ConfigError(
            f"parallel={p.name} (tensor {p.tensor}, pipeline {p.pipeline}, sharding stage "
            f"{p.sharding_stage}): PaddlePaddle's CPU build cannot run tensor, pipeline or "
            "sharding stage 2/3 layouts. Run it on GPUs, or use parallel=dp2 / "
            "sharding_stage1 on CPU; to test a tensor- or pipeline-parallel layout on CPU, "
            "add parallel.cpu_emulation=true (slow, for correctness checks)."
        )
    return {"world_size": world, "nproc_per_node": nproc, "data_parallel_degree": dp}


def validate(run: RunConfig, env: Environment) -> dict[str, Any]:
    """Run every check; return the derived values for the resolved config."""
    check_choices(run)
    check_precision(run, env)
    check_model(run, env)
    check_method(run, env)
    layout = check_parallel(run, env)
    if run.data.streaming and run.train.max_steps <= 0:
        raise ConfigError(
            "data.streaming=true needs train.max_steps > 0: a stream has no known length, so "
            "epochs cannot be counted."
        )
    from ftlab.methods import get_method

    method = get_method(run.method.name)
    method.check(run)
    if run.parallel.tensor > 1 and not method.supports_tensor_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={run.parallel.name}: this method has no "
            "tensor-parallel implementation. Use a sharding or data-parallel layout instead."
        )
    if run.parallel.pipeline > 1:
        check_pipeline(run, method)
    t = run.train
    # Sharding splits the data like data parallelism does, so both multiply the batch.
    batch_ranks = layout["data_parallel_degree"] * run.parallel.sharding
    derived: dict[str, Any] = {
        "device": env.device,
        **layout,
        "global_batch_size": t.per_device_train_batch_size
        * t.gradient_accumulation_steps
        * batch_ranks,
        **method.derived(run.method),
    }
    if run.parallel.pipeline > 1:
        # PaddleNLP's PipelineParallel runs gradient_accumulation_steps micro-batches of
        # per_device_train_batch_size through the stages per optimizer step (1F1B).
        derived["pipeline_micro_batch_size"] = t.per_device_train_batch_size
        derived["pipeline_accumulate_steps"] = t.gradient_accumulation_steps
    return derived


def check_pipeline(run: RunConfig, method: Any) -> None:
    """What a pipeline model (``...ForCausalLMPipe``, split across stages) cannot do."""
    p = run.parallel
    if not method.supports_pipeline_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={p.name} (pipeline {p.pipeline}): this "
            "method has no pipeline-parallel implementation (PaddleNLP's pipeline models "
            "support full fine-tuning and LoRA). Use method=full or method=lora, or a "
            "tensor, sharding or data-parallel layout."
        )


def check_demo_metric(run: RunConfig, dev_records: list[dict]) -> None:
    """Refuse the entity-recall metric on a pipeline model, once the data says it would run.

    The metric runs only when dev records carry ``entities`` (the demo task), which is
    known after the data is read and before the model is loaded (``runner.train``).
    """
    p = run.parallel
    if p.pipeline > 1 and run.eval.demo_metric and any("entities" in r for r in dev_records):
        raise ConfigError(
            f"eval.demo_metric=true with parallel={p.name} (pipeline {p.pipeline}): the "
            "entity-recall metric generates text, and a pipeline model, split across "
            "stages, cannot generate. Set eval.demo_metric=false (the eval loss is still "
            "computed), and score the saved final/ model afterwards in one process with "
            "ftlab-predict."
        )
