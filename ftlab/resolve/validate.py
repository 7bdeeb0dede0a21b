"""Cross-group validation, run once before any model or data is loaded.

Every check raises ``ConfigError`` with a message that names the setting, says why it
cannot work, and what to do instead. Nothing is reset silently: values ftlab computes
(data-parallel degree, global batch, the method's own values such as LoRA's alpha) are
returned as a frozen ``Derived`` and written into the run's resolved config. What a
method, a model family or the data settings require is asked of them (``Method.check``,
the family table, ``check_data_settings``); nothing here names a method or a family.
"""

from __future__ import annotations

from typing import Any

from ftlab.config.choices import check_choice
from ftlab.config.derived import Derived
from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.data.settings import check_data_settings
from ftlab.errors import ConfigError, DataError
from ftlab.methods.catalog import get_method
from ftlab.methods.registry import Method
from ftlab.models.families import FAMILIES, family

# Allowed values of the run's string-typed settings (the data group keeps its own, in
# ``ftlab.data.settings``; the method's are checked by the method).
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("train", "plan", "export"),
    "device": ("auto", "cpu", "gpu"),
    "precision.dtype": ("float32", "bfloat16", "float16"),
    "precision.amp_level": ("O0", "O1", "O2"),
    "train.lr_scheduler_type": ("linear", "cosine", "constant", "constant_with_warmup"),
}


def _lookup(run: RunConfig, dotted: str) -> Any:
    obj: Any = run
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return None
        obj = getattr(obj, part)
    return obj


def check_choices(run: RunConfig) -> None:
    for key, choices in CHOICES.items():
        value = _lookup(run, key)
        if value is not None:
            check_choice(key, value, choices)
    check_choice("model.family", run.model.family, tuple(FAMILIES))


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
    if m.flash_attention and not family(m.family).flash_attention:
        raise ConfigError(
            f"model.flash_attention=true: PaddleNLP's {m.family} models have no flash "
            "attention path. Set model.flash_attention=false."
        )
    if m.flash_attention and env.device == "cpu" and env.paddle_version.startswith("3.0"):
        raise ConfigError(
            f"model.flash_attention=true: PaddlePaddle {env.paddle_version} has no CPU flash "
            "attention kernel. Set model.flash_attention=false, or use paddlepaddle>=3.3."
        )


def check_data(run: RunConfig) -> None:
    try:
        check_data_settings(run.data, run.train.max_steps)
    except DataError as err:  # a setting, not a file: reported as the config error it is
        raise ConfigError(str(err)) from None


def check_parallel(run: RunConfig, env: Environment) -> dict[str, int]:
    """Check the layout against the devices and the model; return the derived degrees."""
    p, launch, arch = run.parallel, run.launch, run.model.arch
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
    check_combination(run, dp)
    if nproc > env.device_count:
        unit = "GPUs" if env.device == "gpu" else "CPU cores (one gloo process each)"
        raise ConfigError(
            f"parallel={p.name} needs {nproc} processes per node but this machine has "
            f"{env.device_count} {unit}. Use a smaller layout (e.g. parallel=single) or more "
            "devices."
        )
    fam = family(run.model.family)
    if p.tensor > 1 and not fam.tensor_parallel:
        raise ConfigError(
            f"parallel.tensor={p.tensor}: PaddleNLP has no tensor-parallel layers for "
            f"model.family={fam.name}. Use a sharding or data-parallel layout."
        )
    if p.tensor > 1 and (
        arch.num_attention_heads % p.tensor or arch.num_key_value_heads % p.tensor
    ):
        raise ConfigError(
            f"parallel.tensor={p.tensor} must divide the attention heads "
            f"({arch.num_attention_heads}) and key/value heads "
            f"({arch.num_key_value_heads}) of model {run.model.name}."
        )
    if p.pipeline > 1 and fam.pipeline_class is None:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline}: PaddleNLP has no pipeline model for "
            f"model.family={fam.name}. Use a tensor, sharding or data-parallel layout."
        )
    # PaddleNLP's pipeline models split evenly when the stages divide the layers, and
    # otherwise spread embedding, layers, norm and head uniformly; each stage needs a layer.
    if p.pipeline > 1 and arch.num_hidden_layers < p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} exceeds model {run.model.name}'s "
            f"{arch.num_hidden_layers} layers: every stage needs at least one. "
            "Use fewer pipeline stages."
        )
    if env.device == "cpu" and p.cpu_emulation:
        from ftlab.distributed.emulation import check_emulation

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


def check_combination(run: RunConfig, dp: int) -> None:
    """Degree combinations PaddleNLP refuses, or would drop without a word."""
    p = run.parallel
    where = f"parallel={p.name}"
    if p.sharding_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.sharding_stage={p.sharding_stage}: one of 0 (off), 1, 2, 3.")
    if p.sharding_stage and p.sharding < 2:
        raise ConfigError(
            f"{where}: parallel.sharding_stage={p.sharding_stage} with parallel.sharding="
            f"{p.sharding} shards over one rank, which PaddleNLP turns off silently. Set "
            "parallel.sharding to 2 or more, or parallel.sharding_stage=0."
        )
    if p.sharding > 1 and not p.sharding_stage:
        raise ConfigError(
            f"{where}: parallel.sharding={p.sharding} without parallel.sharding_stage: "
            "PaddleNLP ignores a sharding degree without a stage. Set sharding_stage=1, 2 "
            "or 3, or use parallel.data for plain data parallelism."
        )
    if p.pipeline > 1 and p.sharding_stage >= 2:
        raise ConfigError(
            f"{where}: pipeline {p.pipeline} with sharding stage {p.sharding_stage}: "
            "PaddleNLP's pipeline parallelism combines with sharding stage 1 only."
        )
    if p.tensor > 1 and p.sharding_stage == 3:
        raise ConfigError(
            f"{where}: tensor {p.tensor} with sharding stage 3: PaddleNLP combines tensor "
            "parallelism with sharding stage 1 or 2 only."
        )
    if p.sequence_parallel and p.tensor < 2:
        raise ConfigError(
            f"{where}: parallel.sequence_parallel=true needs tensor parallelism (it splits "
            "the activations tensor parallelism replicates). Set parallel.tensor >= 2."
        )
    if p.offload and p.sharding_stage not in (2, 3):
        raise ConfigError(
            f"{where}: parallel.offload=true needs sharding stage 2 or 3 (PaddleNLP ignores "
            f"it otherwise); this layout has stage {p.sharding_stage}."
        )
    if p.offload and p.sharding_stage == 2 and dp > 1:
        raise ConfigError(
            f"{where}: parallel.offload=true with sharding stage 2 and data parallel {dp}: "
            "Paddle offloads pure sharding only. Shard over every data rank "
            f"(parallel.sharding={p.sharding * dp}) or turn offload off."
        )
    if p.offload and run.precision.amp_level != "O2":
        raise ConfigError(
            f"{where}: parallel.offload=true needs pure 16-bit training (precision=bf16 or "
            f"fp16_o2): Paddle's sharding offload keeps fp32 master weights on the host; "
            f"precision={run.precision.name} has none."
        )


# launch.* settings read only by parallel=auto and mode=plan (ftlab/planning/cost.py).
COST_SETTINGS = (
    "accelerator",
    "device_memory_gib",
    "device_tflops",
    "mfu",
    "intra_node_gbps",
    "inter_node_gbps",
    "host_gbps",
)


def check_auto_settings(run: RunConfig) -> None:
    """``parallel.auto.*`` and the cost-model settings do nothing without parallel=auto
    (outside plan mode): say so rather than ignore them."""
    from ftlab.config.schema import AutoLayoutSettings, LaunchConfig

    if run.parallel.name == "auto":
        return
    if run.parallel.auto != AutoLayoutSettings():
        raise ConfigError(
            f"parallel.auto.* settings apply to parallel=auto only; parallel={run.parallel.name} "
            "names its layout. Drop them, or use parallel=auto."
        )
    defaults = LaunchConfig()
    changed = [k for k in COST_SETTINGS if getattr(run.launch, k) != getattr(defaults, k)]
    if changed and run.mode != "plan":
        raise ConfigError(
            f"launch.{changed[0]} describes the devices for parallel=auto and mode=plan; with "
            f"parallel={run.parallel.name} and mode={run.mode} nothing reads it. Drop it, or "
            "use parallel=auto or mode=plan."
        )


def check_method_layout(run: RunConfig, method: Method) -> None:
    """What the method's PaddleNLP implementation supports of the layout."""
    p = run.parallel
    if p.tensor > 1 and not method.supports_tensor_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={p.name}: this method has no "
            "tensor-parallel implementation. Use a sharding or data-parallel layout instead."
        )
    if p.pipeline > 1 and not method.supports_pipeline_parallel:
        raise ConfigError(
            f"method={run.method.name} with parallel={p.name} (pipeline {p.pipeline}): this "
            "method has no pipeline-parallel implementation (PaddleNLP's pipeline models "
            "support full fine-tuning and LoRA). Use method=full or method=lora, or a "
            "tensor, sharding or data-parallel layout."
        )


def validate(run: RunConfig, env: Environment) -> Derived:
    """Run every check; return the derived values for the resolved config."""
    check_choices(run)
    check_precision(run, env)
    check_model(run, env)
    check_data(run)
    if run.method.neftune_noise_alpha < 0:
        raise ConfigError(
            f"method.neftune_noise_alpha={run.method.neftune_noise_alpha}: must be >= 0 "
            "(0 disables)."
        )
    check_auto_settings(run)
    layout = check_parallel(run, env)
    method = get_method(run.method.name)
    method.check(run, env)
    check_method_layout(run, method)
    t = run.train
    # Sharding splits the data like data parallelism does, so both multiply the batch.
    batch_ranks = layout["data_parallel_degree"] * run.parallel.sharding
    pipeline = run.parallel.pipeline > 1
    return Derived(
        device=env.device,
        **layout,
        global_batch_size=t.per_device_train_batch_size
        * t.gradient_accumulation_steps
        * batch_ranks,
        method=method.derived(run.method),
        # PaddleNLP's PipelineParallel runs gradient_accumulation_steps micro-batches of
        # per_device_train_batch_size through the stages per optimizer step (1F1B).
        pipeline_micro_batch_size=t.per_device_train_batch_size if pipeline else None,
        pipeline_accumulate_steps=t.gradient_accumulation_steps if pipeline else None,
    )


def check_demo_metric(run: RunConfig, dev_records: list[dict]) -> None:
    """Refuse the entity-recall metric on a pipeline model, once the data says it would run.

    The metric runs only when dev records carry ``entities`` (the demo task), which is
    known after the data is read and before the model is loaded (``training.stages``).
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
