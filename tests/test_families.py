"""Every model family of the family table, on a tiny random model of that family.

Each family gets a directory written by PaddleNLP itself (2 layers, hidden 64, vocab 512,
4 experts for MoE; config.json + safetensors + the shipped stories260K tokenizer), built
once per module. Then, per family: composition reads family and numbers from its
config.json; the plan's linear layers (names and shapes) and parameter count equal the
live PaddleNLP model's exactly; LoRA trains 2 Trainer steps with a finite, falling loss,
reloads onto a fresh base (1e-5) and merges (1e-4); full fine-tuning, QLoRA (ftlab's
backend) and prefix tuning (where the family has a key/value layout) run a training step
with finite loss and gradients; the family's flags agree with PaddleNLP's classes
(tensor-parallel mappings, pipeline class, FlashMask argument); ``mode=export`` output
parses with PaddleNLP's own argument parser. The model options' numbers are checked
against the public config.json of each checkpoint (``tests/fixtures/model_configs``).
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    CPU,
    GPU8,
    REPO,
    TRAIN,
    as_dataset,
    collate,
    compose_run,
    group_options,
    logits_of,
    without_paddle_vars,
)

from ftlab.errors import ConfigError
from ftlab.models.arch import base_counts, model_linears
from ftlab.models.families import FAMILIES, family
from ftlab.resolve.validate import validate

RELOAD_TOL = 1e-5
MERGE_TOL = 1e-4
STORIES = REPO / "ftlab" / "assets" / "stories260k"
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
FIXTURES = REPO / "tests" / "fixtures" / "model_configs"

# family -> (PaddleNLP config class, causal LM class, config kwargs beyond COMMON)
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# DeepSeek's released configs use YaRN rope scaling (PaddleNLP's plain-RoPE path fails).
YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
MLA = dict(
    kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, rope_scaling=YARN
)
DEEPSEEK_MOE = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=512,
)
TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=96, num_key_value_heads=2)),
    "qwen": ("QWenConfig", "QWenForCausalLM", dict(intermediate_size=192, kv_channels=16)),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(intermediate_size=96, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=96,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(intermediate_size=96, num_key_value_heads=2),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
        ),
    ),
    # head_dim 32 with hidden 64 and 4 heads: the size comes from config.json, not h / heads
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        dict(intermediate_size=96, num_key_value_heads=2, head_dim=32),
    ),
    "chatglm_v2": (
        "ChatGLMv2Config",
        "ChatGLMv2ForCausalLM",
        dict(
            ffn_hidden_size=96,
            multi_query_group_num=2,
            kv_channels=16,
            padded_vocab_size=512,
            add_qkv_bias=True,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(**DEEPSEEK_MOE, **MLA, q_lora_rank=None, topk_method="greedy"),
    ),
    # A low-rank query, the router's correction bias and one multi-token-prediction layer.
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            **DEEPSEEK_MOE,
            **MLA,
            q_lora_rank=24,
            n_group=1,
            topk_group=1,
            topk_method="noaux_tc",
            num_nextn_predict_layers=1,
        ),
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, n_head=4)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(intermediate_size=96, word_embed_proj_dim=64, tie_word_embeddings=False),
    ),
}
CONTEXT = dict(max_position_embeddings=512, seq_length=512)

# Training tests run in the default suite for two families that between them cover fused
# q/k/v with multi-query groups (ChatGLM2) and latent attention, routed + shared experts,
# a dense layer, an MTP layer and a router bias (DeepSeek-V3); the other families' runs
# are marked slow (make test-full) to keep the default suite within its budget.
DEFAULT_SUITE = ("chatglm_v2", "deepseek_v3")


def by_cost(names: list[str], default: tuple[str, ...] = DEFAULT_SUITE) -> list[Any]:
    return [n if n in default else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.fast
def test_every_family_has_a_tiny_model() -> None:
    assert sorted(TINY) == sorted(FAMILIES)


def build(name: str) -> Any:
    import paddle
    import paddlenlp.transformers as T

    config_class, model_class, extra = TINY[name]
    kwargs = {**COMMON, **CONTEXT, **extra}
    if name == "bloom":
        kwargs = {k: v for k, v in kwargs.items() if k not in ("num_hidden_layers", "seq_length")}
        kwargs.pop("num_attention_heads")
        kwargs.pop("max_position_embeddings")
    config = getattr(T, config_class)(**kwargs)
    paddle.seed(0)
    model = getattr(T, model_class)(config)
    # PaddleNLP's Bloom initialises its linear weights to zero, which would leave every
    # adapter without a gradient; any all-zero matrix gets small random values instead.
    for param in model.parameters():
        if param.ndim == 2 and float(param.abs().max()) == 0.0:
            param.set_value(paddle.randn(param.shape, dtype=param.dtype) * 0.02)
    return model


BUILT: dict[str, Any] = {}  # the live models the directories were written from


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A PaddleNLP checkpoint directory per family, written once for the module."""
    out = {}
    for name in TINY:
        d = tmp_path_factory.mktemp(name)
        BUILT[name] = build(name)
        BUILT[name].save_pretrained(str(d), safe_serialization=True)
        for f in TOKENIZER_FILES:
            shutil.copy(STORIES / f, d / f)
        shutil.copy(STORIES / "tokenizer.model", d / "sentencepiece.bpe.model")
        out[name] = d
    return out


COMPOSED: dict[tuple[str, ...], Any] = {}


def composed(*overrides: str) -> Any:
    """``compose_run`` once per set of overrides (Hydra's compose is the slow part); the
    callers do not mutate the result."""
    if overrides not in COMPOSED:
        COMPOSED[overrides] = compose_run(list(overrides))
    return COMPOSED[overrides]


def run_for(tiny_dirs: dict[str, Path], name: str, *overrides: str) -> Any:
    return composed(f"model.name_or_path={tiny_dirs[name]}", *overrides)


def changed(run: Any, **changes: Any) -> Any:
    """``run`` with ``group__field=value`` changes, without composing again."""
    import dataclasses

    groups: dict[str, dict[str, Any]] = {}
    for key, value in changes.items():
        group, name = key.split("__")
        groups.setdefault(group, {})[name] = value
    return dataclasses.replace(
        run, **{g: dataclasses.replace(getattr(run, g), **f) for g, f in groups.items()}
    )


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("name", list(TINY))
def test_config_json_gives_the_family_and_the_plan_matches_the_live_model(
    name: str, tiny_dirs: dict[str, Path]
) -> None:
    """Names and shapes of every linear layer, and the parameter count, exactly."""
    from paddle import nn

    run = run_for(tiny_dirs, name)
    assert run.model.family == name and run.model.name == tiny_dirs[name].name
    validate(run, CPU)
    live = BUILT[name]
    live_linears = {
        n: list(layer.weight.shape)
        for n, layer in live.named_sublayers()
        if isinstance(layer, nn.Linear)
    }
    planned = {x.name: [x.fan_in, x.fan_out] for x in model_linears(run.model)}
    assert planned == live_linears
    assert base_counts(run.model).total == sum(int(p.size) for p in live.parameters())
    # Default LoRA targets: every linear layer but the routers and gates.
    targeted = {
        x.name
        for x in model_linears(run.model)
        if any(re.fullmatch(p, x.name) for p in run.model.lora_target_modules)
    }
    expected = {x.name for x in model_linears(run.model) if x.part not in ("router", "mtp")}
    assert targeted == expected


@pytest.mark.parametrize("name", list(TINY))
def test_family_flags_agree_with_paddlenlp(name: str, tiny_dirs: dict[str, Path]) -> None:
    """Pipeline class, FlashMask argument, and flash attention giving the eager logits."""
    import importlib

    import paddle
    import paddlenlp.transformers as T

    from ftlab.models.compat import apply_fixes
    from ftlab.models.loading import output_logits

    apply_fixes()  # what ftlab's model loading does first
    fam = family(name)
    cls = getattr(T, fam.causal_lm_class)
    forward_args = inspect.signature(cls.forward).parameters
    assert fam.flash_mask == ("attn_mask_startend_row_indices" in forward_args)
    module = importlib.import_module(f"paddlenlp.transformers.{name}")
    pipe = f"{fam.paddlenlp_arch}ForCausalLMPipe"
    assert (fam.pipeline_class is not None) == hasattr(module, pipe)
    assert fam.pipeline_class in (None, pipe)
    assert "_get_tensor_parallel_mappings" in dir(cls)
    ids = paddle.to_tensor([[1, 5, 9, 13, 2, 7], [1, 4, 4, 8, 3, 2]])
    logits = []
    for flash in (False, True):
        model = T.AutoModelForCausalLM.from_pretrained(
            str(tiny_dirs[name]), use_flash_attention=flash
        )
        model.eval()
        with paddle.no_grad():
            out = model(input_ids=ids, attention_mask=paddle.ones_like(ids))
        logits.append(output_logits(out).numpy())
    diff = float(np.abs(logits[0] - logits[1]).max())
    if fam.flash_attention:
        assert diff <= 1e-5
    else:
        assert fam.flash_attention_reason
        with pytest.raises(ConfigError, match=re.escape(fam.flash_attention_reason[:40])):
            validate(run_for(tiny_dirs, name, "model.flash_attention=true"), CPU)


@pytest.mark.parametrize("name", [n for n in TINY if family(n).tensor_parallel])
def test_tensor_parallel_mappings_cover_every_split_weight(
    name: str, tiny_dirs: dict[str, Path]
) -> None:
    """PaddleNLP's tensor-parallel split of the family names every weight the plan splits."""
    import paddlenlp.transformers as T

    run = run_for(tiny_dirs, name)
    fam = family(name)
    config = getattr(T, fam.causal_lm_class).config_class.from_pretrained(str(tiny_dirs[name]))
    config.tensor_parallel_degree = 2
    actions = getattr(T, fam.causal_lm_class)._get_tensor_parallel_mappings(config, is_split=True)
    prefix = fam.base_prefix + "."
    linears = model_linears(run.model)
    names = {x.name.removeprefix(prefix) for x in linears}
    split_by_paddlenlp = {
        k.removeprefix(prefix).removesuffix(".weight")
        for k in actions
        if k.endswith(".weight") and k.removeprefix(prefix).removesuffix(".weight") in names
    }
    moe = fam.moe
    split_in_plan = {
        x.name.removeprefix(prefix)
        for x in linears
        if x.tp_split
        and x.part != "router"
        and (x.part != "expert" or (moe is not None and moe.tensor_parallel_experts))
    }
    assert split_in_plan == split_by_paddlenlp


@pytest.mark.parametrize("name", list(TINY))
def test_tensor_and_pipeline_layouts_validate_and_plan(
    name: str, tiny_dirs: dict[str, Path]
) -> None:
    """On GPUs: tp2 splits the weights; pp2 where PaddleNLP has a pipeline model, else the
    refusal names the family."""
    from ftlab.planning.plan import make_plan

    run = run_for(tiny_dirs, name)

    def weights(**layout: Any) -> float:
        r = changed(run, **{f"parallel__{k}": v for k, v in layout.items()})
        return make_plan(r, validate(r, GPU8), "gpu")["memory_bytes"]["weights"]

    single = weights()
    assert weights(tensor=2) < single
    if family(name).pipeline_class is None:
        with pytest.raises(ConfigError, match=f"no pipeline model for model.family={name}"):
            weights(pipeline=2)
    else:
        assert weights(pipeline=2) < single


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", by_cost(list(TINY), default=("deepseek_v3",)))
def test_lora_trains_reloads_and_merges(
    name: str,
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    examples: list[dict],  # noqa: F811
    tokenizer: Any,  # noqa: F811
) -> None:
    from paddlenlp.transformers import AutoModelForCausalLM

    from ftlab.cli.merge import main as merge_main
    from ftlab.data.collate import Collator, count_tokens
    from ftlab.methods.catalog import get_method
    from ftlab.methods.reopen import load_adapter
    from ftlab.models.loading import finish_model, load_model, parameter_counts
    from ftlab.planning.plan import count_parameters
    from ftlab.record.rundir import RunDir
    from ftlab.training.arguments import training_arguments
    from ftlab.training.trainer import FtlabTrainer, MetricsJsonl

    run = run_for(tiny_dirs, name, "method=lora", *TRAIN, "train.max_steps=2")
    validate(run, CPU)
    method = get_method("lora")
    model = method.apply(load_model(run.model, "float32"), run.method, run.model)
    planned = count_parameters(run)
    assert parameter_counts(model) == {"total": planned.total, "trainable": planned.trainable}
    args = training_arguments(run, tmp_path, 2, has_eval=False)
    args.report_to, args.disable_tqdm, args.save_strategy = [], True, "no"
    trainer = FtlabTrainer(
        model=model,
        args=args,
        train_dataset=as_dataset(examples),
        tokenizer=tokenizer,
        data_collator=Collator(tokenizer.pad_token_id),
        count_tokens=count_tokens,
        shuffle=False,
    )
    trainer.add_callback(MetricsJsonl(RunDir(tmp_path)))
    trainer.train()
    logged = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    losses = [x["loss"] for x in logged if x["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    final = tmp_path / "final"
    method.save_final(trainer, model, final)
    (final / "ftlab_method.json").write_text(json.dumps({"method": "lora"}))

    batch = collate(tokenizer, examples)
    reference = logits_of(model, batch)
    base = logits_of(load_model(run.model, "float32"), batch)
    assert np.abs(reference - base).max() > 1e-4  # the adapter trained: the model changed
    reloaded = load_adapter(load_model(run.model, "float32"), final, "lora")
    assert np.abs(logits_of(reloaded, batch) - reference).max() <= RELOAD_TOL
    out = tmp_path / "merged"
    argv = ["--base", str(tiny_dirs[name]), "--adapter", str(final), "--out", str(out)]
    assert merge_main(argv) == 0
    merged = finish_model(AutoModelForCausalLM.from_pretrained(str(out)))  # ftlab's layers
    assert np.abs(logits_of(merged, batch) - reference).max() <= MERGE_TOL


def one_step(model: Any, batch: dict[str, Any]) -> float:
    """Forward with labels and backward; the loss and every trainable gradient are finite."""
    import paddle

    model.train()
    out = model(**{k: paddle.to_tensor(v) for k, v in batch.items()})
    loss = out[0] if isinstance(out, (tuple, list)) else getattr(out, "loss", out)
    loss.backward()
    grads = [p.grad for p in model.parameters() if not p.stop_gradient and p.grad is not None]
    assert grads and all(np.isfinite(g.numpy()).all() for g in grads)
    assert any(np.abs(g.numpy()).max() > 0 for g in grads)
    return float(loss)


@pytest.mark.parametrize("name", by_cost(list(TINY)))
@pytest.mark.parametrize("method", ["full", "qlora", "prefix"])
def test_full_qlora_and_prefix_train_a_step(
    method: str,
    name: str,
    tiny_dirs: dict[str, Path],
    examples: list[dict],  # noqa: F811
    tokenizer: Any,  # noqa: F811
) -> None:
    """A training step with finite loss and gradients; the live count is the plan's."""
    from ftlab.methods.catalog import get_method
    from ftlab.models.loading import parameter_counts
    from ftlab.planning.plan import count_parameters

    run = run_for(tiny_dirs, name, f"method={method}")
    if method == "prefix" and not family(name).prefix_kv_layout:
        with pytest.raises(ConfigError, match=f"method=prefix does not support .*={name}"):
            validate(run, CPU)
        return
    validate(run, CPU)
    m = get_method(method)
    model = m.apply(m.load_base(run.method, run.model, dtype="float32"), run.method, run.model)
    planned = count_parameters(run)
    assert parameter_counts(model) == {"total": planned.total, "trainable": planned.trainable}
    assert np.isfinite(one_step(model, collate(tokenizer, examples[:2])))


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("name", by_cost(list(TINY)))
def test_export_parses_with_paddlenlps_parser(
    name: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from helpers import parse_like_run_finetune

    from ftlab.interop.paddlenlp_export import export_run_finetune

    run = run_for(tiny_dirs, name, "method=lora")
    out = export_run_finetune(run, validate(run, CPU), tmp_path)
    model_args, _, train_args, remaining = parse_like_run_finetune(tmp_path / "run_finetune.json")
    assert remaining == [] and model_args.lora is True
    assert model_args.model_name_or_path == str(tiny_dirs[name])
    fam = family(name)
    notes = "\n".join(out["notes"])
    if not fam.script_lora_targets:
        assert "has no LoRA target list for this family" in notes
    elif name == "mistral":  # the script's mistral list names layers Mistral does not have
        assert "run_finetune.py adapts 10 layers instead" in notes


def test_export_of_expert_parallel_sets_use_expert_parallel(tmp_path: Path) -> None:
    from helpers import parse_like_run_finetune

    from ftlab.interop.paddlenlp_export import export_run_finetune

    run = compose_run(
        ["model=qwen2_57b_a14b", "parallel=tp2", "parallel.nproc_per_node=8", "parallel.expert=4"]
    )
    export_run_finetune(run, validate(run, GPU8), tmp_path)
    _, _, train_args, remaining = parse_like_run_finetune(tmp_path / "run_finetune.json")
    assert remaining == [] and train_args.use_expert_parallel is True


# --------------------------------------------------------------------------- model options

HUB_OPTIONS = [o for o in group_options("model") if o not in ("stories260k", "qwen2")]
# What the plan counts (base model, every parameter) and what one token runs through.
PARAMETERS = {
    "llama2": (6_738_415_616, None),
    "llama3": (8_030_261_248, None),
    "llama3_70b": (70_553_706_496, None),
    "llama3_1_8b": (8_030_261_248, None),
    "qwen2_5_0_5b": (494_032_768, None),
    "qwen2_5_7b": (7_615_616_512, None),
    "qwen2_5_72b": (72_706_203_648, None),
    "qwen2_57b_a14b": (57_408_658_944, 14_249_270_784),
    "mixtral_8x7b": (46_702_792_704, 12_879_925_248),
    "deepseek_v2_lite": (15_706_484_224, 2_661_150_208),
    "gemma_7b": (8_537_680_896, None),
    "chatglm2_6b": (6_243_584_000, None),
}


@pytest.mark.fast
def test_every_model_option_is_covered() -> None:
    assert sorted(HUB_OPTIONS) == sorted(PARAMETERS)
    assert {o: (FIXTURES / f"{o}.json").is_file() for o in HUB_OPTIONS} == dict.fromkeys(
        HUB_OPTIONS, True
    )


@pytest.mark.fast
@pytest.mark.parametrize("option", HUB_OPTIONS)
def test_model_option_is_the_public_config_and_plans_several_layouts(option: str) -> None:
    """Its numbers are what the config.json reader gets from the checkpoint's public file;
    it plans single, tensor, pipeline, sharding stage 3 and (MoE) expert parallel, bf16."""
    import dataclasses

    from ftlab.methods.full import FullMethodConfig
    from ftlab.models.config_json import arch_from_config, complete_arch
    from ftlab.planning.plan import make_plan

    lora = compose_run([f"model={option}", "device=gpu", "precision=bf16"])
    runs = {"lora": lora, "full": dataclasses.replace(lora, method=FullMethodConfig())}

    def plan(method: str, **layout: Any) -> dict:
        """The plan of ``method`` with these ``parallel`` fields (no re-composition)."""
        run = dataclasses.replace(
            runs[method], parallel=dataclasses.replace(runs[method].parallel, **layout)
        )
        return make_plan(run, validate(run, GPU8), "gpu")

    a, fam = lora.model.arch, family(lora.model.family)
    public_config = json.loads((FIXTURES / f"{option}.json").read_text())
    assert complete_arch(arch_from_config(public_config, fam), fam, "test") == a
    total, active = PARAMETERS[option]
    counts = base_counts(lora.model)
    assert counts.total == total  # HF: 6.74B, 8.03B, 70.6B, 0.49B, 7.62B, 72.7B, 57.4B, ...
    assert counts.active == (active or total)
    tp = 2 if a.num_key_value_heads % 4 else 4
    single = plan("lora")
    weights = single["memory_bytes"]["weights"]
    assert plan("lora", tensor=tp)["memory_bytes"]["weights"] < weights
    if fam.pipeline_class is None:
        with pytest.raises(ConfigError, match="PaddleNLP has no pipeline model"):
            plan("lora", pipeline=2)
    else:
        assert plan("lora", pipeline=2)["memory_bytes"]["weights"] < weights / 1.5
    full = plan("full")["memory_bytes"]
    stage3 = plan("full", sharding=2, sharding_stage=3)["memory_bytes"]
    assert stage3["weights"] == pytest.approx(full["weights"] / 2)
    assert stage3["optimizer"] == pytest.approx(full["optimizer"] / 2)
    if not a.num_experts:
        assert single["moe"] is None
        return
    moe = single["moe"]
    assert moe["expert_params"] == single["parameters"]["experts"] > 0
    assert moe["expert_params_per_device"] == moe["expert_params"]
    ep_layout = dict(tensor=2, nproc_per_node=8, expert=4)
    if not fam.moe.expert_parallel:
        with pytest.raises(ConfigError, match="keeps every expert on every rank"):
            plan("lora", **ep_layout)
        return
    ep = plan("full", **ep_layout)
    expert_tp = 2 if fam.moe.tensor_parallel_experts else 1
    assert ep["moe"]["expert_params_per_device"] == pytest.approx(
        moe["expert_params"] / (4 * expert_tp)
    )
    assert ep["moe"]["experts_per_device_per_layer"] == a.num_experts // 4
    tp2 = plan("full", tensor=2)
    saved = (moe["expert_params"] / expert_tp) * (1 - 1 / 4) * 2  # bf16 weights of 3/4 experts
    assert ep["memory_bytes"]["weights"] == pytest.approx(tp2["memory_bytes"]["weights"] - saved)


# --------------------------------------------------------------------------- bad input


def write_config(tmp_path: Path, body: dict[str, Any]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(body))
    return tmp_path


def public(option: str, **changes: Any) -> dict[str, Any]:
    return {**json.loads((FIXTURES / f"{option}.json").read_text()), **changes}


@pytest.mark.fast
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (None, r"model.name_or_path='.*': no config.json in the directory.*supported families: "),
        ({"model_type": "bert"}, r"model_type 'bert' is not a causal-LM family .* Supported"),
        ({"model_type": "mamba"}, r"model_type 'mamba' is not supported: a state-space model"),
        (
            public("llama3", architectures=["Qwen2ForCausalLM"]),
            r"model_type 'llama' but architectures \['Qwen2ForCausalLM'\], which PaddleNLP",
        ),
        (public("llama3_1_8b", head_dim=64), "head_dim=64, but PaddleNLP 3.0.0b4's llama"),
        (public("qwen2_57b_a14b", decoder_sparse_step=2), "decoder_sparse_step=2"),
        (public("deepseek_v2_lite", rope_scaling=None), "only with YaRN rope scaling"),
        (
            {"model_type": "opt", "hidden_size": 1024, "word_embed_proj_dim": 512},
            "word_embed_proj_dim=512",
        ),
        (public("llama3", num_hidden_layers=None), r"model.arch.num_hidden_layers is not set"),
    ],
)
def test_bad_model_directories_fail_in_one_line(
    body: dict[str, Any] | None, message: str, tmp_path: Path
) -> None:
    directory = tmp_path / "model"
    directory.mkdir()
    if body is not None:
        write_config(
            directory, {k: v for k, v in body.items() if v is not None or k != "num_hidden_layers"}
        )
    from ftlab.config.schema import ModelConfig
    from ftlab.models.config_json import resolve_model

    with pytest.raises(ConfigError, match=message) as info:
        resolve_model(ModelConfig(name_or_path=str(directory)))  # what composition calls
    assert "\n" not in str(info.value)


@pytest.mark.fast
def test_yaml_numbers_contradicting_config_json_are_refused_naming_both(tmp_path: Path) -> None:
    d = write_config(tmp_path / "qwen", public("qwen2_5_0_5b"))
    with pytest.raises(
        ConfigError,
        match=r"model.arch.num_hidden_layers=2 contradicts .*"
        r"config.json, which gives num_hidden_layers=24",
    ):
        compose_run([f"model.name_or_path={d}", "model.arch.num_hidden_layers=2"])
    with pytest.raises(ConfigError, match="model.family=llama contradicts .*family qwen2"):
        compose_run([f"model.name_or_path={d}", "model.family=llama"])
    # The option's own numbers agree with the file: a local copy of a hub checkpoint.
    run = compose_run(["model=qwen2_5_0_5b", f"model.name_or_path={d}"])
    assert run.model.arch == compose_run(["model=qwen2_5_0_5b"]).model.arch
    assert run.model.name == "qwen2_5_0_5b"
    other = write_config(tmp_path / "v", public("qwen2_5_0_5b", vocab_size=1000))
    with pytest.raises(ConfigError, match="model.arch.vocab_size=151936 contradicts"):
        compose_run(["model=qwen2_5_0_5b", f"model.name_or_path={other}"])


@pytest.mark.fast
def test_hub_name_without_numbers_or_family_is_refused() -> None:
    with pytest.raises(ConfigError, match="is not in the local Hugging Face cache"):
        compose_run(["model.name_or_path=someone/some-model"])
    with pytest.raises(ConfigError, match="model.arch.hidden_size is not set .* is a hub name"):
        compose_run(["model.name_or_path=someone/some-model", "model.family=llama"])


def test_resolved_config_records_what_config_json_gave(tiny_dirs: dict[str, Path]) -> None:
    from ftlab.resolve.compose import resolved_config_yaml

    run = run_for(tiny_dirs, "deepseek_v3")
    text = resolved_config_yaml(run, validate(run, CPU))
    for line in (
        "family: deepseek_v3",
        "num_experts: 4",
        "q_lora_rank: 24",
        "router_bias: true",
        "num_nextn_predict_layers: 1",
        "dense_layers:",
        ".*mlp.experts.\\d+.gate_proj",
    ):
        assert line in text


EP4 = dict(parallel__tensor=2, parallel__nproc_per_node=8)


@pytest.mark.fast
@pytest.mark.parametrize(
    ("option", "changes", "env", "message"),
    [
        ("qwen2_5_7b", dict(parallel__expert=2), GPU8, "has no experts"),
        ("mixtral_8x7b", dict(**EP4, parallel__expert=2), GPU8, "keeps every expert on every"),
        ("qwen2_57b_a14b", dict(**EP4, parallel__expert=3), GPU8, "must divide the 64 experts"),
        ("qwen2_57b_a14b", dict(parallel__data=8, parallel__expert=8), GPU8, "only inside a hybr"),
        ("qwen2_57b_a14b", dict(**EP4, parallel__expert=2), GPU8, "data-parallel degree is 4"),
        ("qwen2_57b_a14b", EP4, GPU8, "Set parallel.expert=4"),
        (
            "deepseek_v2_lite",
            dict(parallel__tensor=2, parallel__nproc_per_node=4, parallel__expert=2),
            None,
            "gloo backend does not",
        ),
        ("chatglm2_6b", dict(parallel__tensor=4), GPU8, r"heads \(32\) and key/value heads \(2\)"),
        ("mixtral_8x7b", dict(parallel__pipeline=2), GPU8, "no pipeline model for .*=mixtral"),
        ("chatglm2_6b", dict(model__flash_attention=True), GPU8, "reshapes the .batch, seq."),
        ("deepseek_v2_lite", dict(model__flash_attention=True), GPU8, None),
    ],
)
def test_family_and_layout_refusals(
    option: str, changes: dict[str, Any], env: Any, message: str | None
) -> None:
    from ftlab.config.environment import Environment

    run = changed(composed(f"model={option}", "data.max_length=512"), **changes)
    env = env or Environment("cpu", 4, "3.3.1")  # cpu: 4 cores, to reach the gloo reason
    if message is None:  # a family whose flash attention is supported validates
        validate(run, env)
        return
    with pytest.raises(ConfigError, match=message):
        validate(run, env)


@pytest.mark.fast
def test_prefix_is_refused_for_a_family_without_a_key_value_layout() -> None:
    with pytest.raises(ConfigError, match="method=prefix does not support model.family=gemma"):
        validate(compose_run(["model=gemma_7b", "method=prefix"]), CPU)


@pytest.mark.fast
def test_never_tied_family_refuses_a_tied_checkpoint(tmp_path: Path) -> None:
    d = write_config(tmp_path / "m", public("mixtral_8x7b", tie_word_embeddings=True))
    with pytest.raises(ConfigError, match="never ties its output layer"):
        validate(compose_run([f"model.name_or_path={d}"]), CPU)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2_moe", "chatglm_v2"])
def test_ftlab_command_on_a_model_directory_without_a_yaml(
    name: str, tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """``ftlab model.name_or_path=DIR``: family and numbers from DIR/config.json, recorded;
    LoRA trains on the demo task; the summary's parameter count is the plan's."""
    import os
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from ftlab.planning.plan import count_parameters

    run_dir = tmp_path / "run"
    env = without_paddle_vars(os.environ)
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "ftlab"),
            f"model.name_or_path={tiny_dirs[name]}",
            "train.max_steps=3",
            "train.logging_steps=1",
            "eval.demo_metric=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = OmegaConf.load(run_dir / "resolved_config.yaml")
    assert resolved.model.family == name and resolved.model.name == tiny_dirs[name].name
    summary = json.loads((run_dir / "summary.json").read_text())
    planned = count_parameters(run_for(tiny_dirs, name))
    assert summary["parameters"] == {"total": planned.total, "trainable": planned.trainable}
    assert np.isfinite(summary["final_loss"]) and summary["final_loss"] < summary["first_loss"]


def test_pad_token_must_be_in_the_vocabulary(monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pad_token fills in only for a tokenizer without one, and only with its own token."""
    from ftlab.config.schema import ModelConfig
    from ftlab.errors import ModelLoadError
    from ftlab.models import loading

    class NoPad:
        pad_token = None

        def get_vocab(self) -> dict[str, int]:
            return {"<unk>": 0, "<s>": 1}

    monkeypatch.setattr(loading, "load_pretrained", lambda *a, **k: NoPad())
    with pytest.raises(ModelLoadError, match=r"model.pad_token='<pad>' is not in the vocabulary"):
        loading.load_tokenizer(ModelConfig(name="m", name_or_path="m", pad_token="<pad>"))
    assert (
        loading.load_tokenizer(ModelConfig(name="m", name_or_path="m", pad_token="<unk>")).pad_token
        == "<unk>"
    )


@pytest.mark.fast
def test_docs_family_table_says_what_the_rows_say() -> None:
    """Every family has a row in the docs' family table (docs/models.md), and its prefix,
    PP and FlashMask cells agree with the family table (a "yes" there is one of the tests
    above)."""
    text = (REPO / "docs" / "models.md").read_text()
    table = text[text.index("| family | checkpoints |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells
    assert sorted(rows) == sorted(FAMILIES)
    for name, cells in rows.items():
        fam = family(name)
        full, lora, qlora, prefix, tp, pp, flashmask, plan = cells[2:]
        assert (full, lora, qlora, tp, plan) == ("yes",) * 5
        assert prefix.startswith("yes" if fam.prefix_kv_layout else "no")
        assert pp.startswith("yes" if fam.pipeline_class else "no")
        assert flashmask.startswith("yes" if fam.flash_mask else "no")
