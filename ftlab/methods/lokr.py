"""LoKr: the weight update as a Kronecker product ``w1 (x) w2`` (w2 optionally low-rank).

PaddleNLP 3.0.0b4's ``LoKrLinear.merge`` calls a ``get_weight`` method that does not
exist (AttributeError) and would apply the scale twice; ftlab merges with the layer's
own ``get_adapter_weight()``, the very matrix its forward adds, so merged and unmerged
outputs agree. PaddleNLP's unified checkpoint cannot save a ``LoKrModel``, and its own
``save_pretrained`` pickles the tensors; ftlab's subclass writes ``lokr_config.json`` and
the tensors as safetensors (``ftlab.methods.state``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError
from ftlab.methods.linear import LinearAdapterMethod, target_patterns
from ftlab.methods.merging import fold_linear_adapters
from ftlab.methods.registry import register_method
from ftlab.methods.state import load_trainable_state, save_peft_model

if TYPE_CHECKING:
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig
    from ftlab.models.arch import Linear


@dataclass
class LokrMethodConfig(MethodConfig):
    name: str = "lokr"
    lokr_dim: int = 8  # rank of w2 (and of w1 with decompose_both) when it is factorised
    lokr_alpha: float = 0.0  # scale = alpha / lokr_dim; 0 -> alpha = lokr_dim (scale 1)
    # Size of w1's factor of each dimension; -1 -> the most balanced factorisation.
    factor: int = -1
    decompose_both: bool = False  # also factorise w1 into two low-rank matrices
    target_modules: list[str] | None = None  # None -> model.lora_target_modules


@functools.cache
def _lokr_model_class() -> type:
    from paddlenlp.peft import LoKrModel

    class FtlabLoKrModel(LoKrModel):
        """LoKrModel whose saved tensors are safetensors, not a pickle."""

        def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
            save_peft_model(self, save_directory, self.lokr_config, **kwargs)

    return FtlabLoKrModel


def lokr_layers(model: Any) -> list[tuple[str, Any]]:
    from paddlenlp.peft.lokr.lokr_layers import LoKrLinear

    return [(n, layer) for n, layer in model.named_sublayers() if isinstance(layer, LoKrLinear)]


def split_dimension(dim: int, factor: int) -> tuple[int, int]:
    """How PaddleNLP's ``LoKrLinear`` splits one dimension into (w1 side, w2 side).

    Restated without Paddle so the plan can count LoKr's parameters: a ``factor`` that
    divides ``dim`` is taken as is; otherwise (and for -1) the divisors of ``dim`` are
    walked upwards while the first side stays below the second and at most ``factor``,
    and the pair is returned smaller side first.
    """
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    limit = dim if factor == -1 else factor
    m, n = 1, dim
    while m < n:
        candidate = m + 1
        while dim % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dim // candidate
    return (m, n) if m <= n else (n, m)


@register_method
class Lokr(LinearAdapterMethod):
    name = "lokr"
    schema = LokrMethodConfig
    argument_flag = "lokr"
    argument_keys = {"lokr_dim": "lokr_dim"}
    unified_checkpoint = False
    supports_tensor_parallel = False
    fixed_on_resume = ("lokr_dim", "factor", "decompose_both", "target_modules")
    size_setting = "lokr_dim"
    plan_label = "LoKr dim"

    def check(self, run: RunConfig, env: Environment) -> None:
        m = run.method
        if m.lokr_dim < 1:
            raise ConfigError(f"method.lokr_dim={m.lokr_dim}: must be >= 1.")
        super().check(run, env)
        if m.factor == 0 or m.factor < -1:
            raise ConfigError(f"method.factor={m.factor}: use -1 (balanced) or a positive size.")

    def apply(
        self, model: paddle.nn.Layer, cfg: LokrMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import LoKrConfig

        config = LoKrConfig(
            target_modules=target_patterns(cfg, model_cfg),
            lokr_dim=cfg.lokr_dim,
            lokr_alpha=cfg.lokr_alpha,
            factor=cfg.factor,
            decompose_both=cfg.decompose_both,
            dtype=model.config.dtype,
            base_model_name_or_path=model_cfg.name_or_path,
        )
        lokr = _lokr_model_class()(model, config)
        if not lokr_layers(lokr.model):
            raise ConfigError(
                f"method=lokr: no linear layer matches the target modules {config.target_modules}."
            )
        return lokr

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: LokrMethodConfig | None = None
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import LoKrConfig

        trained_dir = Path(trained_dir)
        config = LoKrConfig.from_pretrained(str(trained_dir))
        # LoKrModel reads the base model's config.json from this path; the adapter dir has
        # a copy, so a moved run dir still loads.
        config.base_model_name_or_path = str(trained_dir)
        model = _lokr_model_class()(base, config)
        load_trainable_state(model, trained_dir)
        return model

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        from paddlenlp.peft.lokr.lokr_layers import LoKrLinear

        def delta(layer: Any) -> Any:
            # The scaled kron(w1, w2), transposed to the [in, out] layout forward adds.
            return layer.get_adapter_weight() if isinstance(layer, LoKrLinear) else None

        inner = model.model
        fold_linear_adapters(inner, delta, "LoKr")
        return inner

    def derived(self, cfg: LokrMethodConfig) -> dict[str, Any]:
        alpha = cfg.lokr_alpha or float(cfg.lokr_dim)
        return {"lokr_scale": alpha / cfg.lokr_dim}

    def size_limit(self, cfg: LokrMethodConfig, linear: Linear) -> tuple[int, str]:
        # lokr_dim is the rank of the Kronecker factor w2 (out_2 x in_2); with
        # decompose_both also of w1 (out_1 x in_1).
        out_1, out_2 = split_dimension(linear.fan_out, cfg.factor)
        in_1, in_2 = split_dimension(linear.fan_in, cfg.factor)
        if cfg.decompose_both and min(out_1, in_1) < min(out_2, in_2):
            return min(out_1, in_1), f"the smaller side of its factor w1 ({out_1} x {in_1})"
        return min(out_2, in_2), f"the smaller side of its factor w2 ({out_2} x {in_2})"

    def adapter_size(self, cfg: LokrMethodConfig, linear: Linear) -> int:
        """w1 (``[out_1, in_1]``, or two rank-``lokr_dim`` factors with decompose_both)
        and w2 (``[out_2, in_2]``, factorised when the rank is below half its larger side).
        """
        r = cfg.lokr_dim
        out_1, out_2 = split_dimension(linear.fan_out, cfg.factor)
        in_1, in_2 = split_dimension(linear.fan_in, cfg.factor)
        if cfg.decompose_both and r < max(out_1, in_1) / 2:
            w1 = r * (out_1 + in_1)
        else:
            w1 = out_1 * in_1
        w2 = r * (out_2 + in_2) if r < max(out_2, in_2) / 2 else out_2 * in_2
        return w1 + w2

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        notes.append(
            "LoKr: run_finetune.py has only lokr_dim; alpha, factor and "
            "decompose_both are its own defaults."
        )
        return self.flag_arguments(run.method)
