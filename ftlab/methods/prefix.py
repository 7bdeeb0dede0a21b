"""Prefix tuning: learned key/value vectors prepended to every layer's attention.

PaddleNLP builds one key and one value per prefix token, layer and *key/value head*, but
sizes them by ``multi_query_group_num`` and falls back to the number of query heads when
that is unset; on a grouped-query model (fewer key/value heads than query heads) the
attention concat then fails. ftlab always passes the model's ``num_key_value_heads``.

PaddleNLP's unified checkpoint then fails to save a ``PrefixModelForCausalLM``: it asks
the model for ``can_generate()`` and ``generation_config``, which this wrapper (unlike
``LoRAModel``) does not pass through to the model it wraps. ftlab's subclass adds both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.methods.registry import AdapterPlan, Method, register_method
from ftlab.models.arch import kv_dim
from ftlab.models.families import FAMILIES, family
from ftlab.models.loading import num_layers

if TYPE_CHECKING:
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig


@dataclass
class PrefixMethodConfig(MethodConfig):
    name: str = "prefix"
    num_prefix_tokens: int = 16  # virtual tokens per layer
    # Reparametrise the prefix through a 2-layer MLP (more stable training, more params).
    prefix_projection: bool = False
    prefix_projection_hidden_size: int | None = None  # None -> the model's hidden size
    prefix_dropout: float = 0.0


def kv_heads(config: Any) -> int:
    """Key/value heads of a live PaddleNLP config (ChatGLM2 names them multi-query groups)."""
    for name in ("num_key_value_heads", "multi_query_group_num"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return int(config.num_attention_heads)


def prefix_families() -> list[str]:
    return sorted(name for name, f in FAMILIES.items() if f.prefix_kv_layout)


def _postprocess(model_type: str) -> Any:
    """The function turning the prefix encoder's output into per-layer (key, value) caches."""
    import paddlenlp.peft.prefix as prefix_module

    layout = FAMILIES[model_type].prefix_kv_layout if model_type in FAMILIES else None
    if layout is None:
        raise ConfigError(
            f"method=prefix: no key/value layout known for model type {model_type!r}; "
            f"supported: {', '.join(prefix_families())}."
        )
    return getattr(prefix_module, layout)


@functools.cache
def _prefix_model_class() -> type:
    from paddlenlp.peft import PrefixModelForCausalLM

    class FtlabPrefixModel(PrefixModelForCausalLM):
        """PrefixModelForCausalLM that PaddleNLP's unified checkpoint can save."""

        def can_generate(self) -> bool:
            return self.model.can_generate()

        @property
        def generation_config(self) -> Any:
            return self.model.generation_config

    return FtlabPrefixModel


@register_method
class Prefix(Method):
    name = "prefix"
    schema = PrefixMethodConfig
    argument_flag = "prefix_tuning"
    argument_keys = {"num_prefix_tokens": "num_prefix_tokens"}
    fixed_on_resume = ("num_prefix_tokens", "prefix_projection", "prefix_projection_hidden_size")
    preference_unsupported = (
        "prefix tuning's virtual tokens start from random values and change the model's "
        "outputs before any training (measured: the first DPO step's loss is 1.31, not "
        "log 2), so the base model is not the policy training starts from and cannot be "
        "its reference"
    )
    merge_unsupported = (
        "prefix tuning adds learned key/value entries to every attention layer; they are "
        "extra positions attended to, not a change of any weight matrix, so no merged "
        "weights can reproduce them. Serve the base model with the adapter instead "
        "(ftlab.methods.reopen.load_trained)."
    )
    flash_mask_unsupported = (
        "its learned prefix adds key/value positions in front of every row, which FlashMask "
        "indices (one per row position) cannot describe"
    )

    def check(self, run: RunConfig, env: Environment) -> None:
        m = run.method
        if m.num_prefix_tokens < 1:
            raise ConfigError(f"method.num_prefix_tokens={m.num_prefix_tokens}: must be >= 1.")
        if not 0.0 <= m.prefix_dropout < 1.0:
            raise ConfigError(f"method.prefix_dropout={m.prefix_dropout}: must be in [0, 1).")
        if not family(run.model.family).prefix_kv_layout:
            raise ConfigError(
                f"method=prefix does not support model.family={run.model.family}: PaddleNLP has "
                f"no prefix key/value layout for it (it has for {', '.join(prefix_families())})."
            )

    def apply(
        self, model: paddle.nn.Layer, cfg: PrefixMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import PrefixConfig

        c = model.config
        prefix_config = PrefixConfig(
            num_prefix_tokens=cfg.num_prefix_tokens,
            num_attention_heads=c.num_attention_heads,
            multi_query_group_num=kv_heads(c),
            num_hidden_layers=num_layers(c),
            hidden_size=c.hidden_size,
            prefix_projection=cfg.prefix_projection,
            prefix_projection_hidden_size=cfg.prefix_projection_hidden_size or c.hidden_size,
            prefix_dropout=cfg.prefix_dropout,
            dtype=c.dtype,
        )
        return _prefix_model_class()(
            model, prefix_config, postprocess_past_key_value=_postprocess(c.model_type)
        )

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: PrefixMethodConfig | None = None
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import PrefixConfig

        trained_dir = Path(trained_dir)
        if not any(
            (trained_dir / f).exists()
            for f in ("peft_model.safetensors.index.json", "prefix_model_state.pdparams")
        ):
            raise ModelLoadError(f"no prefix-tuning weights in {trained_dir}")
        saved = PrefixConfig.from_pretrained(str(trained_dir))
        c = base.config
        heads = kv_heads(c)
        layers = num_layers(c)
        if saved.multi_query_group_num != heads or saved.num_hidden_layers != layers:
            raise ModelLoadError(
                f"the prefix in {trained_dir} was trained for {saved.num_hidden_layers} layers "
                f"x {saved.multi_query_group_num} key/value heads; this base model has "
                f"{layers} x {heads}. Load it onto its own base model."
            )
        return _prefix_model_class().from_pretrained(
            base, str(trained_dir), postprocess_past_key_value=_postprocess(base.config.model_type)
        )

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        raise ConfigError(f"method=prefix cannot be merged: {self.merge_unsupported}")

    def plan(self, run: RunConfig) -> AdapterPlan:
        """The prefix encoder: one key and one value per prefix token, layer and key/value
        head (an embedding), or that reached through a two-layer MLP with projection."""
        m, a = run.method, run.model.arch
        n, width = m.num_prefix_tokens, kv_dim(run.model)
        caches = width * a.num_hidden_layers * 2
        if m.prefix_projection:
            hidden = m.prefix_projection_hidden_size or a.hidden_size
            size = n * width + (width * hidden + hidden) + (hidden * caches + caches)
        else:
            size = n * caches
        return AdapterPlan(
            adapter=size,
            details={"num_prefix_tokens": n, "prefix_projection": m.prefix_projection},
            lines=[f"adapter        prefix of {n} tokens x {a.num_hidden_layers} layers"],
        )

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        notes.append(
            "prefix tuning: run_finetune.py chooses projection and dropout per model "
            "(get_prefix_tuning_params); method.prefix_projection / prefix_dropout are "
            "not arguments there."
        )
        return self.flag_arguments(run.method)
