"""LoRA and its variants (rsLoRA, LoRA+, PiSSA, MoSLoRA, MoRA) through ``paddlenlp.peft``.

What ftlab changes on top of PaddleNLP 3.0.0b4, and why:

* LoRA+ works through the parameter attribute PaddleNLP puts on ``lora_B``
  (``ParamAttr(learning_rate=lora_plus_scale)``), which Paddle's AdamW multiplies into the
  learning rate of that parameter; MoRA has no ``lora_B``, so that combination is refused.
* PiSSA: PaddleNLP initialises lazily at the first forward, rewriting the frozen base
  weight to ``W_res = W - A0 @ B0`` (``A0``/``B0`` from the top singular vectors). The
  saved adapter (trained ``A``, ``B``) only reproduces the model on top of ``W_res``,
  which is never saved; worse, reloading it with ``pissa=True`` runs the initialisation
  again and overwrites the loaded ``A``, ``B``. ftlab initialises eagerly in ``apply``
  (the same SVD), and ``after_save`` records ``A0``/``B0`` (as small as the adapter) in
  ``pissa_init.safetensors``; ``load`` rebuilds ``W_res`` from the fresh base with the
  very same operation and loads ``A``/``B`` untouched. Reload is then bit-identical on
  the same machine, and elsewhere differs only by matmul rounding; re-running the SVD
  instead would depend on LAPACK details and on an ill-conditioned subspace whenever
  singular values near the rank cut are close; converting to a rank-2r LoRA on the
  original base (``[A, A0] @ [B; -B0]``) cancels large terms and was measured at
  ~5e-5 logit error here; saving ``W_res`` itself would cost a copy of every adapted
  weight.
* MoRA: ``LoRALinear.get_delta_weight`` builds the wrong matrix for MoRA, so ``merge``
  gives different outputs. MoRA's update is linear in the input, so ftlab obtains its
  exact matrix by applying the layer's own MoRA map to the identity.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError, ModelLoadError
from ftlab.methods.linear import LinearAdapterMethod, target_patterns
from ftlab.methods.merging import fold_linear_adapters
from ftlab.methods.registry import register_method
from ftlab.models.arch import model_linears
from ftlab.models.families import family
from ftlab.models.weights import read_safetensors

if TYPE_CHECKING:
    import paddle

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig
    from ftlab.models.arch import Linear

PEFT_INDEX = "peft_model.safetensors.index.json"
PISSA_INIT = "pissa_init.safetensors"


@dataclass
class LoraMethodConfig(MethodConfig):
    name: str = "lora"
    lora_rank: int = 8
    lora_alpha: float | None = None  # None -> 2 * lora_rank (recorded as derived)
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None -> model.lora_target_modules
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    lora_plus_scale: float = 1.0  # LoRA+: lr multiplier of B over A (1.0 = off)
    pissa: bool = False  # initialise from the principal singular vectors of W
    lora_use_mixer: bool = False  # MoSLoRA: learnable r x r mixer between A and B
    use_mora: bool = False  # MoRA: square high-rank update instead of A @ B


def script_lora_alpha(rank: int, rslora: bool) -> float:
    """The alpha PaddleNLP's run_finetune.py fixes (it has no setting): 4 with rsLoRA, else
    2 x rank."""
    return 4.0 if rslora else 2.0 * rank


def lora_alpha(cfg: LoraMethodConfig) -> float:
    """The alpha in force: the user's, or 2 * rank (a common default, recorded as derived)."""
    return float(cfg.lora_alpha) if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank


def adapter_weights_present(trained_dir: Path) -> bool:
    """ftlab saves LoRA weights as safetensors behind PEFT_INDEX; PaddleNLP's pickled
    ``lora_model_state.pdparams`` is read only with model.allow_pickle (refused before)."""
    return any((trained_dir / name).exists() for name in (PEFT_INDEX, "lora_model_state.pdparams"))


def lora_layers(model: Any) -> list[tuple[str, Any]]:
    """(name, layer) of every single-device LoRA layer under ``model``."""
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    return [(n, layer) for n, layer in model.named_sublayers() if isinstance(layer, LoRALinear)]


def set_lora_enabled(model: Any, enabled: bool) -> int:
    """Switch every LoRA layer under ``model`` on or off; returns how many were switched.

    Covers PaddleNLP's LoRA layers (plain, tensor-parallel, quantized: the layers its
    ``LoRAModel.disable_lora`` knows) and ftlab's ``QuantLoRALinear``. With the adapter
    off each layer computes its base weight alone (and, for MoRA and MoSLoRA, nothing of
    the adapter either): the model LoRA training started from.
    """
    from paddlenlp.peft.lora.lora_model import AVAILABLE_LAYERS

    from ftlab.models.quant.qlinear import QuantLoRALinear

    kinds = (*AVAILABLE_LAYERS, QuantLoRALinear)
    switched = 0
    for _, layer in model.named_sublayers():
        if isinstance(layer, kinds):
            layer.disable_lora = not enabled
            switched += 1
    if not switched:
        raise ModelLoadError("the model has no LoRA layers to switch on or off")
    return switched


def lora_delta(layer: Any) -> Any:
    """The exact ``[in, out]`` update a ``LoRALinear`` adds to ``x @ W``."""
    import paddle

    if layer.use_mora:
        # x -> _apply_mora(x) is linear, so its matrix is its value on the identity.
        return layer._apply_mora(paddle.eye(layer.weight.shape[0], dtype=layer.weight.dtype))
    return layer.get_delta_weight()


def pissa_residual(weight: Any, a0: Any, b0: Any) -> Any:
    """``W - A0 @ B0`` in float32, cast back: the one formula apply and load both use."""
    return (weight.astype("float32") - a0 @ b0).astype(weight.dtype)


def pissa_init(layer: Any) -> tuple[Any, Any]:
    """PiSSA init of one layer: A0, B0 from the top-r singular triplets, base -> residual.

    Returns float32 numpy copies of A0 and B0 (what ``load`` needs to rebuild the residual).
    """
    import paddle

    with paddle.no_grad():
        w = layer.weight.astype("float32")
        u, s, vh = paddle.linalg.svd(w, full_matrices=False)
        root = paddle.sqrt(s[: layer.r])
        a0 = u[:, : layer.r] * root  # U_r diag(sqrt S_r)
        b0 = root.unsqueeze(-1) * vh[: layer.r]  # diag(sqrt S_r) V_r^T
        layer.lora_A.set_value(a0.astype(layer.lora_A.dtype))
        layer.lora_B.set_value(b0.astype(layer.lora_B.dtype))
        layer.weight.set_value(pissa_residual(layer.weight, a0, b0))
    layer.apply_pissa = True  # PaddleNLP's lazy init must not run again
    return a0.numpy(), b0.numpy()


def restore_pissa_residual(model: Any, init_file: Path) -> None:
    """Turn a fresh base's adapted weights into the residuals PiSSA trained on."""
    import paddle

    init = read_safetensors(init_file)
    layers = lora_layers(model.model)
    expected = {f"{n}.lora_{m}" for n, _ in layers for m in ("A", "B")}
    if set(init) != expected:
        raise ModelLoadError(
            f"{init_file} covers {len(init)} tensors but the adapter has {len(expected)} "
            "LoRA matrices; the files do not belong together."
        )
    with paddle.no_grad():
        for name, layer in layers:
            a0 = paddle.to_tensor(init[f"{name}.lora_A"])
            b0 = paddle.to_tensor(init[f"{name}.lora_B"])
            layer.weight.set_value(pissa_residual(layer.weight, a0, b0))
            layer.apply_pissa = True


def lora_size(m: LoraMethodConfig, lin: Linear) -> int:
    """LoRA parameters PaddleNLP creates for one linear (MoRA: one square matrix)."""
    r = m.lora_rank
    if m.use_mora:
        r_hat = int(math.sqrt((lin.fan_in + lin.fan_out) * r) + 0.5) // 2 * 2
        return r_hat * r_hat
    return r * (lin.fan_in + lin.fan_out) + (r * r if m.lora_use_mixer else 0)


@register_method
class Lora(LinearAdapterMethod):
    name = "lora"
    schema = LoraMethodConfig
    supports_pipeline_parallel = True
    fixed_on_resume = ("lora_rank", "target_modules", "pissa", "lora_use_mixer", "use_mora")
    size_setting = "lora_rank"
    plan_label = "LoRA rank"
    argument_flag = "lora"
    argument_keys = {
        k: k
        for k in ("lora_rank", "rslora", "lora_plus_scale", "pissa", "lora_use_mixer", "use_mora")
    }

    def check(self, run: RunConfig, env: Environment) -> None:
        m = run.method
        if m.lora_rank < 1:
            raise ConfigError(f"method.lora_rank={m.lora_rank}: the rank must be >= 1.")
        if not 0.0 <= m.lora_dropout < 1.0:  # nan fails this too
            raise ConfigError(
                f"method.lora_dropout={m.lora_dropout}: a probability in [0, 1) (0 turns it off)."
            )
        super().check(run, env)
        if m.lora_plus_scale <= 0:
            raise ConfigError(
                f"method.lora_plus_scale={m.lora_plus_scale}: must be > 0 (1.0 turns LoRA+ off)."
            )
        variants = [k for k in ("pissa", "lora_use_mixer", "use_mora") if getattr(m, k)]
        if len(variants) > 1:
            raise ConfigError(
                f"method: {' and '.join(f'{k}=true' for k in variants)} cannot be combined "
                "(each replaces LoRA's A @ B update in its own way). Choose one."
            )
        if m.use_mora and m.lora_plus_scale != 1.0:
            raise ConfigError(
                f"method.lora_plus_scale={m.lora_plus_scale} with method.use_mora=true: MoRA has "
                "one square matrix and no lora_B for LoRA+ to speed up. Set lora_plus_scale=1.0."
            )
        if m.pissa and m.rslora:
            raise ConfigError(
                "method.rslora=true with method.pissa=true: PiSSA fixes the LoRA scale at 1 "
                "(its A and B carry the singular values), so rsLoRA would have no effect. "
                "Set one of them to false."
            )
        if variants and (run.parallel.tensor > 1 or run.parallel.pipeline > 1):
            raise ConfigError(
                f"method.{variants[0]}=true with parallel={run.parallel.name}: PaddleNLP "
                "implements PiSSA, MoSLoRA and MoRA for single-device layers only. Use "
                "data parallel or sharding, or plain LoRA."
            )

    def size_limit(self, cfg: LoraMethodConfig, linear: Linear) -> tuple[int, str]:
        # A rank-r update of an m x n matrix has rank <= min(m, n).
        return min(linear.fan_in, linear.fan_out), "the smaller side"

    def lora_config(self, cfg: LoraMethodConfig, model_cfg: ModelConfig, model: Any) -> Any:
        from paddlenlp.peft import LoRAConfig

        return LoRAConfig(
            target_modules=target_patterns(cfg, model_cfg),
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

    def apply(
        self, model: paddle.nn.Layer, cfg: LoraMethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import LoRAModel

        lora_model = LoRAModel(model, self.lora_config(cfg, model_cfg, model))
        lora_model.mark_only_lora_as_trainable()
        if cfg.pissa:
            # Eager init (PaddleNLP defers it to the first forward); A0/B0 kept for after_save.
            lora_model._ftlab_pissa_init = {
                name: pissa_init(layer) for name, layer in lora_layers(lora_model.model)
            }
        return lora_model

    def save(self, model: paddle.nn.Layer, out_dir: Path) -> None:
        """The adapter as a run's ``final/`` holds it (PaddleNLP's unified checkpoint:
        ``peft_model-00001-of-00001.safetensors`` and its index). ``LoRAModel.save_pretrained``
        would write ``lora_model_state.pdparams``, a pickle ftlab refuses to read back."""
        from safetensors.numpy import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        shard = "peft_model-00001-of-00001.safetensors"
        state = {k: v.numpy() for k, v in model.get_trainable_state_dict().items()}
        save_file(state, str(out_dir / shard), metadata={"format": "np"})
        index = {
            "metadata": {"total_size": sum(int(v.nbytes) for v in state.values())},
            "weight_map": dict.fromkeys(state, shard),
        }
        (out_dir / "peft_model.safetensors.index.json").write_text(json.dumps(index, indent=4))
        model.lora_config.save_pretrained(str(out_dir))
        self.after_save(model, out_dir)

    def after_save(self, model: paddle.nn.Layer, out_dir: Path) -> None:
        if not model.lora_config.pissa:
            return
        init = getattr(model, "_ftlab_pissa_init", None)
        if init is None:
            raise ModelLoadError(
                "this PiSSA model was not built by ftlab's lora method (no initial A0/B0 "
                "recorded), so its adapter could not be reloaded onto the original base."
            )
        from safetensors.numpy import save_file

        tensors = {}
        for name, (a0, b0) in init.items():
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a0, b0
        save_file(tensors, str(Path(out_dir) / PISSA_INIT), metadata={"format": "np"})

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: LoraMethodConfig | None = None
    ) -> paddle.nn.Layer:
        from paddlenlp.peft import LoRAConfig, LoRAModel

        trained_dir = Path(trained_dir)
        # LoRAModel.from_pretrained only logs an error and starts from fresh LoRA weights
        # when none are found; ftlab refuses instead.
        if not adapter_weights_present(trained_dir):
            raise ModelLoadError(f"no LoRA adapter weights in {trained_dir}")
        pissa = LoRAConfig.from_pretrained(str(trained_dir)).pissa
        if pissa and not (trained_dir / PISSA_INIT).is_file():
            raise ModelLoadError(
                f"{trained_dir} holds a PiSSA adapter without {PISSA_INIT} (a Trainer "
                "checkpoint, not a run's final/): its A/B only make sense on the rewritten "
                "base W - A0 @ B0, and A0/B0 were not saved here. Load the run's final/."
            )
        model = LoRAModel.from_pretrained(base, str(trained_dir))
        if pissa:
            restore_pissa_residual(model, trained_dir / PISSA_INIT)
        return model

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        from paddlenlp.peft.lora.lora_layers import LoRALinear

        def delta(layer: Any) -> Any:
            return lora_delta(layer) if isinstance(layer, LoRALinear) else None

        inner = model.model
        fold_linear_adapters(inner, delta, "LoRA")
        return inner

    def reference_mode(self, cfg: LoraMethodConfig) -> str:
        # PiSSA rewrote the base weights to W - A0 @ B0: with the adapter off the model is
        # that residual, not the model training started from, so it needs a frozen copy.
        return "copy" if cfg.pissa else "adapter"

    def set_adapter_enabled(self, model: paddle.nn.Layer, enabled: bool) -> None:
        set_lora_enabled(model, enabled)

    def derived(self, cfg: LoraMethodConfig) -> dict[str, Any]:
        alpha = lora_alpha(cfg)
        if cfg.pissa or cfg.use_mora:
            scale = 1.0  # PaddleNLP fixes it: PiSSA's A/B carry the scale, MoRA has none
        else:
            scale = alpha / (cfg.lora_rank**0.5) if cfg.rslora else alpha / cfg.lora_rank
        return {"lora_alpha": alpha, "lora_scaling": scale}

    def adapter_size(self, cfg: LoraMethodConfig, linear: Linear) -> int:
        return lora_size(cfg, linear)

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        m = run.method
        args = self.flag_arguments(m)
        script_alpha = script_lora_alpha(m.lora_rank, m.rslora)
        if lora_alpha(m) != script_alpha:
            notes.append(
                f"method.lora_alpha={lora_alpha(m):g}: run_finetune.py fixes alpha at "
                f"{script_alpha:g} ({'4 with rsLoRA' if m.rslora else '2 x lora_rank'})."
            )
        if m.lora_dropout:
            notes.append(
                f"method.lora_dropout={m.lora_dropout}: run_finetune.py uses no LoRA dropout."
            )
        # What run_finetune.py's get_lora_target_modules adapts for the family, compared
        # layer by layer with ftlab's targets (both matched on the plan's layer names).
        fam = family(run.model.family)
        if not fam.script_lora_targets:
            notes.append(
                f"model.family={fam.name}: run_finetune.py has no LoRA target list for this "
                "family (its get_lora_target_modules raises); pass lora target modules to it "
                f"by hand: {target_patterns(m, run.model)}."
            )
        else:
            ours = {x.name for x in self.targeted_linears(run)}
            theirs = {
                x.name
                for x in model_linears(run.model)
                if any(re.fullmatch(f".*{t}.*", x.name) for t in fam.script_lora_targets)
            }
            if ours != theirs:
                notes.append(
                    f"LoRA targets {target_patterns(m, run.model)} ({len(ours)} layers): "
                    f"run_finetune.py adapts {len(theirs)} layers instead, those matching "
                    f"{', '.join(fam.script_lora_targets)}."
                )
        return args

    def import_arguments(
        self, args: Mapping[str, Any], model: ModelConfig, notes: list[str]
    ) -> tuple[dict[str, Any], set[str]] | None:
        found = super().import_arguments(args, model, notes)
        if found is None:
            return None
        settings, keys = found
        # run_finetune.py's alpha is fixed (no key): 2 x rank, or 4 with rsLoRA.
        alpha = script_lora_alpha(int(settings.get("lora_rank", 8)), bool(settings.get("rslora")))
        if alpha != 2.0 * settings.get("lora_rank", 8):
            settings["lora_alpha"] = alpha
        # ... and it adapts the layers its get_lora_target_modules lists for the family.
        fam = family(model.family)
        if not fam.script_lora_targets:
            notes.append(
                f"run_finetune.py has no LoRA target list for model.family={fam.name} (its "
                "LoRA fails there); ftlab keeps its default targets (every linear layer)."
            )
            return settings, keys
        script = [f".*{t}.*" for t in fam.script_lora_targets]
        linears = [x.name for x in model_linears(model)]

        def matched(patterns: list[str]) -> set[str]:
            return {n for n in linears if any(re.fullmatch(p, n) for p in patterns)}

        if matched(script) != matched(list(model.lora_target_modules)):
            settings["target_modules"] = script
        return settings, keys
