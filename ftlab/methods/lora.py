"""LoRA and its variants (rsLoRA, LoRA+, PiSSA, MoSLoRA, MoRA) through ``paddlenlp.peft``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import LoraMethodConfig
from ftlab.errors import ModelLoadError
from ftlab.methods.registry import Method, register_method

if TYPE_CHECKING:
    import paddle

    from ftlab.config.schema import ModelConfig


def lora_alpha(cfg: LoraMethodConfig) -> float:
    """The alpha in force: the user's, or 2 * rank (a common default, recorded as derived)."""
    return float(cfg.lora_alpha) if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


def lora_targets(cfg: LoraMethodConfig, model_cfg: ModelConfig) -> list[str]:
    return list(cfg.target_modules) if cfg.target_modules else list(model_cfg.lora_target_modules)


def adapter_weights_present(trained_dir: Path) -> bool:
    return any(
        (trained_dir / name).exists()
        for name in ("peft_model.safetensors.index.json", "lora_model_state.pdparams")
    )


@register_method
class Lora(Method):
    name = "lora"
    schema = LoraMethodConfig

    def lora_config(self, cfg: LoraMethodConfig, model_cfg: ModelConfig, model: Any):
        from paddlenlp.peft import LoRAConfig

        return LoRAConfig(
            target_modules=lora_targets(cfg, model_cfg),
            r=cfg.lora_rank,
            lora_alpha=lora_alpha(cfg),
            lora_dropout=cfg.lora_dropout,
            rslora=cfg.rslora,
            lora_plus_scale=cfg.lora_plus_scale,
            pissa=cfg.pissa,
            lora_use_mixer=cfg.lora_use_mixer,
            use_mora=cfg.use_mora,
            merge_weights=False,
            base_model_name_or_path=model_cfg.name_or_path,
            dtype=model.config.dtype,
        )

    def apply(self, model: paddle.nn.Layer, cfg: Any, model_cfg: ModelConfig) -> paddle.nn.Layer:
        from paddlenlp.peft import LoRAModel

        lora_model = LoRAModel(model, self.lora_config(cfg, model_cfg, model))
        lora_model.mark_only_lora_as_trainable()
        return lora_model

    def load(self, base: paddle.nn.Layer, trained_dir: Path, cfg: Any) -> paddle.nn.Layer:
        from paddlenlp.peft import LoRAModel

        # LoRAModel.from_pretrained only logs an error and starts from fresh LoRA weights
        # when none are found; ftlab refuses instead.
        if not adapter_weights_present(trained_dir):
            raise ModelLoadError(f"no LoRA adapter weights in {trained_dir}")
        return LoRAModel.from_pretrained(base, str(trained_dir))

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        model.merge()
        return model.model

    def derived(self, cfg: Any) -> dict[str, Any]:
        alpha = lora_alpha(cfg)
        scale = alpha / (cfg.lora_rank**0.5) if cfg.rslora else alpha / cfg.lora_rank
        return {"lora_alpha": alpha, "lora_scaling": scale}
