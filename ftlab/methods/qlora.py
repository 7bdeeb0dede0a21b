"""QLoRA: a frozen blockwise-quantized base with LoRA adapters trained in fp32.

Two backends. ``paddlenlp``: PaddleNLP's own quantized LoRA layers (CUDA only; nf4/fp4
also need PaddleSlim's CUDA ops). ``ftlab``: ``ftlab.models.quant``, written with Paddle tensor
ops, so it runs on any device. ``auto`` takes PaddleNLP's where it can run, else ftlab's;
the resolved config and the summary say which ran. A requested backend that cannot run
fails with the reason: PaddleNLP without PaddleSlim would silently drop the quantized
LoRA layers, which ftlab never lets happen.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.choices import check_choice
from ftlab.distributed.layout import model_parallel_kwargs
from ftlab.errors import ConfigError
from ftlab.methods.linear import target_patterns
from ftlab.methods.lora import Lora, LoraMethodConfig, lora_alpha
from ftlab.methods.registry import AdapterPlan, register_method
from ftlab.models.compat import apply_fixes
from ftlab.models.loading import (
    check_model_dir,
    checkpoint_rope_theta,
    finish_model,
    load_model,
    load_pretrained,
    model_settings,
)
from ftlab.models.quant.algos import ALGOS, PADDLENLP_ALGO, bytes_per_param
from ftlab.models.quant.backend import native_backend_available
from ftlab.models.weights import read_safetensors

if TYPE_CHECKING:
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig

# PaddleNLP quantizes nf4/fp4 in blocks (these keys); int8/int4 per channel.
BLOCKWISE_IN_PADDLENLP = ("nf4", "fp4")
BLOCKWISE_KEYS = {"weight_blocksize": "quant_block_size", "weight_double_quant": "double_quant"}
ADAPTER_FILE = "qlora_adapter.safetensors"
QUANT_CONFIG_FILE = "quant_config.json"


@dataclass
class QLoraMethodConfig(LoraMethodConfig):
    name: str = "qlora"
    quant_algo: str = "nf4"  # nf4 | fp4 | int8 | int4
    quant_block_size: int = 64
    double_quant: bool = False
    quant_backend: str = "auto"  # auto | paddlenlp | ftlab


def quantized_bytes_per_param(m: QLoraMethodConfig) -> float:
    """Codes + block scales per quantized parameter (ftlab's blockwise layout)."""
    return bytes_per_param(m.quant_algo, m.quant_block_size, m.double_quant)


def resolve_backend(cfg: QLoraMethodConfig, env: Environment | None = None) -> str:
    """The backend that runs on ``env`` (this machine when None); a requested one that
    cannot run there is a ``ConfigError`` saying why."""
    ok, why = native_backend_available(cfg.quant_algo, env)
    if cfg.quant_backend == "auto":
        return "paddlenlp" if ok else "ftlab"
    if cfg.quant_backend == "paddlenlp" and not ok:
        where = "on the target GPU machine" if env is not None and env.described else "here"
        raise ConfigError(f"method.quant_backend=paddlenlp cannot run {where}: {why}.")
    return cfg.quant_backend


def qlora_spec(cfg: QLoraMethodConfig, compute_dtype: str = "float32") -> Any:
    from ftlab.models.quant.qlinear import QLoRASpec

    return QLoRASpec(
        algo=cfg.quant_algo,
        block_size=cfg.quant_block_size,
        double_quant=cfg.double_quant,
        lora_rank=cfg.lora_rank,
        lora_alpha=lora_alpha(cfg),
        lora_dropout=cfg.lora_dropout,
        rslora=cfg.rslora,
        compute_dtype=compute_dtype,
    )


@register_method
class QLora(Lora):
    name = "qlora"
    schema = QLoraMethodConfig
    # PaddleNLP's quantized LoRA layers have column/row-parallel forms; ftlab's have not,
    # so ``check`` allows tensor parallelism only where the paddlenlp backend will run.
    supports_tensor_parallel = True
    supports_pipeline_parallel = False  # quantizes a plain causal LM while loading
    # The trained artefact is the adapter plus quantization settings, written by
    # ``save_final``; the base is re-quantized deterministically on load.
    unified_checkpoint = False
    fixed_on_resume = (
        *Lora.fixed_on_resume,
        "quant_algo",
        "quant_block_size",
        "double_quant",
        "quant_backend",
    )

    def check(self, run: RunConfig, env: Environment) -> None:
        cfg = run.method
        check_choice("method.quant_algo", cfg.quant_algo, ALGOS)
        check_choice("method.quant_backend", cfg.quant_backend, ("auto", "paddlenlp", "ftlab"))
        super().check(run, env)
        if cfg.quant_backend == "paddlenlp" and env.device == "cpu":
            raise ConfigError(
                f"method.quant_backend=paddlenlp with quant_algo={cfg.quant_algo}: PaddleNLP's "
                "quantized kernels need a GPU (nf4/fp4 also need PaddleSlim's CUDA ops). "
                "Use method.quant_backend=ftlab (or auto), which runs on any device."
            )
        resolve_backend(cfg, env)  # a requested backend that cannot run on env says why
        unsupported = [f for f in ("pissa", "lora_use_mixer", "use_mora") if getattr(cfg, f)]
        if unsupported or cfg.lora_plus_scale != 1.0:
            raise ConfigError(
                f"method=qlora does not support {', '.join(unsupported) or 'lora_plus_scale'}: "
                "the quantized layer carries plain LoRA (optionally rsLoRA). Use method=lora "
                "for the other variants."
            )
        if run.parallel.tensor > 1:
            _check_tensor_parallel(cfg, run.parallel.name, env)
        if cfg.quant_block_size < 2 or cfg.quant_block_size % 2:
            raise ConfigError(
                f"method.quant_block_size={cfg.quant_block_size}: must be an even number "
                ">= 2 (two 4-bit codes share a byte)."
            )

    def load_base(
        self,
        cfg: QLoraMethodConfig,
        model_cfg: ModelConfig,
        *,
        dtype: str,
        overrides: Mapping[str, Any] | None = None,
    ) -> paddle.nn.Layer:
        """Quantize each target weight as the checkpoint is read (ftlab backend)."""

        backend = resolve_backend(cfg)  # training runs here: this machine decides
        overrides = dict(overrides or {})
        check_model_dir(model_cfg)
        if backend == "paddlenlp":
            return _load_paddlenlp_quantized(model_cfg, dtype, cfg, overrides)
        path = Path(model_cfg.name_or_path)
        if not list(path.glob("*.safetensors")):
            # A hub name or a .pdparams checkpoint: load in float, then quantize layer by
            # layer (peak memory holds the float model once).
            from ftlab.models.quant.qlinear import quantize_model

            model = load_model(model_cfg, dtype, overrides)
            quantize_model(model, target_patterns(cfg, model_cfg), qlora_spec(cfg))
            return model
        import paddle
        from paddlenlp.transformers import AutoConfig, AutoModelForCausalLM
        from paddlenlp.transformers.model_utils import no_init_weights

        from ftlab.models.quant.loading import SafetensorsSource, quantize_while_loading

        apply_fixes()
        config = AutoConfig.from_pretrained(str(path), dtype=dtype, **overrides)
        for key, value in model_settings(model_cfg, getattr(config, "rope_theta", None)).items():
            setattr(config, key, value)  # flash attention, RoPE scaling: as load_model does
        with no_init_weights(True), paddle.LazyGuard():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        with SafetensorsSource(path) as source:
            # Tied embeddings: the checkpoint may hold lm_head.weight as a copy.
            quantize_while_loading(
                model, source, target_patterns(cfg, model_cfg), qlora_spec(cfg), strict=False
            )
        return finish_model(model)

    def apply(
        self, model: paddle.nn.Layer, cfg: QLoraMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        from ftlab.models.quant.qlinear import QuantLoRALinear

        if any(isinstance(m, QuantLoRALinear) for m in model.sublayers()):
            return model  # the ftlab backend quantized and froze while loading
        return super().apply(model, cfg, model_cfg)  # paddlenlp backend: its LoRAModel

    def save_final(self, trainer: Any, model: paddle.nn.Layer, out_dir: Path) -> None:
        from ftlab.models.quant.qlinear import QuantLoRALinear, lora_state_dict, quant_config

        if not any(isinstance(m, QuantLoRALinear) for m in model.sublayers()):
            trainer.save_model(str(out_dir))
            return
        from safetensors.numpy import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.numpy() for k, v in lora_state_dict(model).items()}
        save_file(state, str(out_dir / ADAPTER_FILE))
        (out_dir / QUANT_CONFIG_FILE).write_text(
            json.dumps(quant_config(model), indent=2, sort_keys=True) + "\n"
        )
        model.config.save_pretrained(str(out_dir))

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: QLoraMethodConfig | None = None
    ) -> paddle.nn.Layer:
        """``base`` must be the float base model; it is re-quantized with the saved spec."""
        from ftlab.models.quant.qlinear import QLoRASpec, load_lora_state_dict, quantize_model

        qfile = trained_dir / QUANT_CONFIG_FILE
        if not qfile.exists():
            return super().load(base, trained_dir, cfg)
        import paddle

        saved = json.loads(qfile.read_text())
        layers = saved.pop("quantized_layers")
        spec = QLoRASpec.from_dict(
            {k: v for k, v in saved.items() if k not in ("format", "version")}
        )
        # Deterministic quantization: the same base weights give the same codes.
        quantize_model(base, [re.escape(n) for n in layers], spec)
        adapter = read_safetensors(trained_dir / ADAPTER_FILE)
        state = {k: paddle.to_tensor(v) for k, v in adapter.items()}
        load_lora_state_dict(base, state)
        return base

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        from ftlab.models.quant.qlinear import QuantLoRALinear, dequantize_and_merge

        if any(isinstance(m, QuantLoRALinear) for m in model.sublayers()):
            dequantize_and_merge(model)
            return model
        return super().merge(model)

    def environment_derived(self, cfg: QLoraMethodConfig, env: Environment) -> dict[str, Any]:
        return {"quant_backend": resolve_backend(cfg, env)}

    def assumptions(self, run: RunConfig, env: Environment) -> list[str]:
        if not env.described:
            return []
        m = run.method
        backend = resolve_backend(m, env)
        if backend == "ftlab":
            return [f"QLoRA runs ftlab's quantized layers there (quant_backend={m.quant_backend})"]
        slim = (
            "; nf4/fp4 need PaddleSlim's CUDA ops (paddleslim_ops) there, assumed installed "
            "(target.paddleslim_ops=true)"
            if m.quant_algo in ("nf4", "fp4")
            else ""
        )
        return [
            f"QLoRA runs PaddleNLP's quantized kernels there (quant_backend={m.quant_backend} "
            f"-> paddlenlp, {PADDLENLP_ALGO[m.quant_algo]}){slim}"
        ]

    def plan(self, run: RunConfig) -> AdapterPlan:
        m, plan = run.method, super().plan(run)
        targeted = self.targeted_linears(run)
        per_param = quantized_bytes_per_param(m)
        plan.quantized = sum(x.size for x in targeted)
        plan.quantized_per_layer = sum(x.size for x in targeted if x.layer == 0)
        plan.quantized_lm_head = sum(x.size for x in targeted if x.layer is None)
        plan.quantized_layers = sum(x.size for x in targeted if x.layer is not None)
        plan.quantized_bytes_per_param = per_param
        plan.adapter_fp32 = True
        plan.details.update(
            quant_algo=m.quant_algo,
            quant_block_size=m.quant_block_size,
            double_quant=m.double_quant,
            quantized_bytes_per_param=per_param,
            quantized_base_bytes=plan.quantized * per_param,
        )
        mib = plan.quantized * per_param / 2**20
        size = f"{mib / 1024:,.2f} GiB" if mib >= 1024 else f"{mib:,.1f} MiB"
        plan.lines.append(
            f"quantized base {plan.quantized:,} params as {m.quant_algo} "
            f"(block {m.quant_block_size}{', double quant' if m.double_quant else ''}): "
            f"{per_param:.4f} B/param, {size}"
        )
        return plan

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        m = run.method
        args = super().export(run, notes)
        args["weight_quantize_algo"] = PADDLENLP_ALGO[m.quant_algo]
        if m.quant_algo in BLOCKWISE_IN_PADDLENLP:
            args.update(
                {key: getattr(m, f) for key, f in BLOCKWISE_KEYS.items()},
            )
        else:
            notes.append(
                f"method.quant_algo={m.quant_algo}: PaddleNLP quantizes per channel "
                f"(weight_only_*), not in blocks of {m.quant_block_size}."
            )
        notes.append(
            "QLoRA in run_finetune.py runs PaddleNLP's quantized kernels: GPU only, "
            "and nf4/fp4 need PaddleSlim's CUDA ops."
        )
        return args

    def import_arguments(
        self, args: Mapping[str, Any], model: ModelConfig, notes: list[str]
    ) -> tuple[dict[str, Any], set[str]] | None:
        algo = {v: k for k, v in PADDLENLP_ALGO.items()}.get(args.get("weight_quantize_algo"))
        found = super().import_arguments(args, model, notes) if algo else None
        if found is None:
            return None
        settings, keys = found
        settings["quant_algo"] = algo
        keys.add("weight_quantize_algo")
        if algo in BLOCKWISE_IN_PADDLENLP:
            settings.update({f: args[key] for key, f in BLOCKWISE_KEYS.items() if key in args})
            keys.update(BLOCKWISE_KEYS)
        notes.append(
            "method.quant_backend=auto: PaddleNLP's quantized kernels where they run (as in "
            "run_finetune.py), ftlab's elsewhere; the run records which ran."
        )
        return settings, keys


def _check_tensor_parallel(cfg: QLoraMethodConfig, layout: str, env: Environment) -> None:
    """Tensor-parallel QLoRA exists only as PaddleNLP's (CUDA) quantized parallel layers."""
    if cfg.quant_backend == "paddlenlp":
        return  # whether it can run on this device is checked with the precision/device
    if cfg.quant_backend == "auto":
        ok, why = native_backend_available(cfg.quant_algo, env)
        if ok:
            return
        # The probe's own advice (switch to ftlab's backend) is wrong for this layout.
        why = re.sub(r",? (or )?use quant_backend=ftlab$", "", why, flags=re.IGNORECASE)
        where = "on the target GPU machine" if env.described else "here"
        reason = f"quant_backend=auto resolves to ftlab's backend {where} ({why})"
    else:
        reason = "quant_backend=ftlab was chosen"
    raise ConfigError(
        f"method=qlora with parallel={layout}: {reason}, and ftlab's quantized layers have no "
        "tensor-parallel form. Use method.quant_backend=paddlenlp on GPUs (its quantized "
        "LoRA layers are column/row parallel; nf4/fp4 also need PaddleSlim's CUDA ops), or a "
        "sharding or data-parallel layout."
    )


def _load_paddlenlp_quantized(
    model_cfg: ModelConfig, dtype: str, cfg: QLoraMethodConfig, overrides: dict[str, Any]
) -> Any:
    """PaddleNLP's native quantized loading (CUDA). CPU-only CI cannot exercise it."""
    from paddlenlp.quantization.quantization_config import QuantizationConfig
    from paddlenlp.transformers import AutoModelForCausalLM

    qcfg = QuantizationConfig(
        weight_quantize_algo=PADDLENLP_ALGO[cfg.quant_algo],
        qlora_weight_blocksize=cfg.quant_block_size,
        qlora_weight_double_quant=cfg.double_quant,
    )
    model = load_pretrained(
        "model",
        AutoModelForCausalLM,
        model_cfg.name_or_path,
        dtype=dtype,
        quantization_config=qcfg,
        **overrides,
        **model_settings(model_cfg, checkpoint_rope_theta(model_cfg)),
        **model_parallel_kwargs(),  # tensor-parallel jobs: this rank's quantized shard
    )
    return finish_model(model)
