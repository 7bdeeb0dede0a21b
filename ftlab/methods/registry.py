"""The method interface and its registry: a leaf that imports no method.

A method is one YAML in ``conf/method/`` plus one module holding its schema and one
``@register_method`` class that answers every question the rest of ftlab asks about it:
its checks against the model and the layout, its derived values, its parameter count for
the plan, its ``run_finetune.json`` keys, the settings a resume must keep, the setting
that sizes it in run lists, how it loads, trains, saves, reloads and merges. Callers
loop over this interface and never name a method. The built-in methods are imported by
``ftlab.methods.catalog``, which sits above this module (so no import cycle).

This module must stay importable without Paddle: composition and planning run before any
heavy import, so methods import Paddle inside their functions only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError
from ftlab.models.loading import load_model

if TYPE_CHECKING:
    import paddle
    from paddlenlp.trainer import Trainer

    from ftlab.config.environment import Environment
    from ftlab.config.schema import ModelConfig, RunConfig


@dataclass
class AdapterPlan:
    """What a method adds to, or changes in, the base model: counted from ``model.arch``.

    ``plan`` turns it into parameter counts and per-device memory; the fields split the
    counts the way tensor and pipeline parallelism split them (per decoder layer vs the
    LM head and embedding).
    """

    trains_base: bool = False  # every base parameter trains (full fine-tuning)
    adapter: int = 0  # trainable parameters the method adds
    adapter_per_layer: int = 0  # ... of which in one decoder layer (the rest: head/global)
    frozen: int = 0  # frozen parameters the method adds (VeRA's random projections)
    frozen_per_layer: int = 0
    quantized: int = 0  # base parameters stored quantized (QLoRA's target linears)
    quantized_per_layer: int = 0
    quantized_lm_head: int = 0
    # Sums over all decoder layers (MoE models' layers differ); 0: per-layer x layers.
    adapter_layers: int = 0
    frozen_layers: int = 0
    quantized_layers: int = 0
    quantized_bytes_per_param: float = 0.0  # codes + scales
    adapter_fp32: bool = False  # adapter kept in fp32 whatever the weight dtype (QLoRA)
    targets: list[str] = field(default_factory=list)  # short names of adapted layers
    details: dict[str, Any] = field(default_factory=dict)  # plan.json's method section
    lines: list[str] = field(default_factory=list)  # lines of the printed plan


class Method:
    """How one method turns a base model into a trainable one, saves, reloads and merges.

    ``merge_unsupported`` is None for mergeable methods, else the reason a merge cannot
    exist (prefix tuning and ReFT add computation that no weight matrix can absorb).

    Saving is two steps: the Trainer's ``save_model`` (it knows the distributed layout),
    then ``after_save`` on the main process, for what PaddleNLP does not write itself.
    ``load`` must work from the saved directory alone (``ftlab-merge --adapter DIR`` has
    no run config), so everything it needs is written there.
    """

    name: ClassVar[str]
    schema: ClassVar[type[MethodConfig]]
    merge_unsupported: ClassVar[str | None] = None
    # None when packed batches may carry FlashMask indices (``model.flash_mask``), else why
    # the method's model cannot take them.
    flash_mask_unsupported: ClassVar[str | None] = None
    # Methods whose PaddleNLP implementation supports tensor-parallel layers.
    supports_tensor_parallel: ClassVar[bool] = True
    # Methods that work on PaddleNLP's pipeline models (``...ForCausalLMPipe``).
    supports_pipeline_parallel: ClassVar[bool] = False
    # Whether PaddleNLP's unified checkpoint can save this method's model. It handles
    # plain models, LoRAModel and PrefixModelForCausalLM only; other wrappers raise there
    # and are saved through their own ``save_pretrained`` instead.
    unified_checkpoint: ClassVar[bool] = True
    # Settings (fields of ``schema``) that shape the trained tensors: a resume that
    # changed one would load a checkpoint into a different model, so it is refused.
    fixed_on_resume: ClassVar[tuple[str, ...]] = ()
    # The setting that sizes the method (its rank), shown in run lists; None: no such.
    size_setting: ClassVar[str | None] = None
    # The saved artefact is a whole model (reloading needs no base model).
    saves_whole_model: ClassVar[bool] = False
    # Why a preference stage (DPO, KTO) cannot train this method; None: it can.
    preference_unsupported: ClassVar[str | None] = None
    # run_finetune.py's flag that selects this method (``lora``, ``prefix_tuning``, ...).
    argument_flag: ClassVar[str | None] = None
    # run_finetune.py keys that carry one of this method's settings unchanged (key -> field
    # of ``schema``): ``export`` writes them and ``ftlab-import`` reads them back from here.
    argument_keys: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ settings

    def check(self, run: RunConfig, env: Environment) -> None:
        """Reject settings this method cannot honour on this model, layout and machine."""

    def derived(self, cfg: MethodConfig) -> dict[str, Any]:
        """Values computed from the settings, written into the resolved config."""
        return {}

    def environment_derived(self, cfg: MethodConfig, env: Environment) -> dict[str, Any]:
        """Values that depend on the machine (``env``: this one, or a described target)
        as well as the settings, written into the resolved config beside ``derived``."""
        return {}

    def assumptions(self, run: RunConfig, env: Environment) -> list[str]:
        """What this method assumes about a described machine (``env.described``) that the
        run depends on; the plan and the export list these lines."""
        return []

    def plan(self, run: RunConfig) -> AdapterPlan:
        """What the method adds to the base model, from ``model.arch`` (no Paddle)."""
        raise ConfigError(
            f"mode=plan has no parameter model for method={self.name}. Measure it with a "
            "short train.max_steps run instead, or give its Method class a plan()."
        )

    def export(self, run: RunConfig, notes: list[str]) -> dict[str, Any]:
        """Its ``run_finetune.json`` keys; what the script cannot express goes to ``notes``."""
        raise ConfigError(
            f"mode=export has no run_finetune.py mapping for method={self.name}; give its "
            "Method class an export()."
        )

    def reference_mode(self, cfg: MethodConfig) -> str:
        """How a preference stage gets its reference model (the policy before training).

        ``adapter``: switch this method's adapter off on the trained model itself, so no
        second copy is held (``set_adapter_enabled``); ``copy``: a frozen copy of the base,
        loaded before ``apply`` (the plan counts it). Either is right only for a method
        whose ``apply`` leaves the model's outputs unchanged until training moves it
        (adapters initialised to no effect); others set ``preference_unsupported``.
        """
        return "copy"

    def set_adapter_enabled(self, model: paddle.nn.Layer, enabled: bool) -> None:
        """Switch the adapter on or off (methods whose ``reference_mode`` is ``adapter``)."""
        raise NotImplementedError(f"method={self.name} cannot switch its adapter off")

    def flag_arguments(self, cfg: MethodConfig) -> dict[str, Any]:
        """``argument_flag`` and the ``argument_keys`` of ``cfg``: where exports start."""
        args: dict[str, Any] = {self.argument_flag: True} if self.argument_flag else {}
        args.update({key: getattr(cfg, f) for key, f in self.argument_keys.items()})
        return args

    def import_arguments(
        self, args: Mapping[str, Any], model: ModelConfig, notes: list[str]
    ) -> tuple[dict[str, Any], set[str]] | None:
        """The inverse of ``export``: (this method's settings, the keys read) for the
        arguments ``run_finetune.py`` would use (the file over PaddleNLP's defaults), or None
        when they do not select this method. What the import assumed goes to ``notes``."""
        if self.argument_flag is None or not args.get(self.argument_flag):
            return None
        settings = {f: args[key] for key, f in self.argument_keys.items() if key in args}
        return settings, {self.argument_flag, *self.argument_keys}

    def size(self, cfg: dict[str, Any]) -> Any:
        """The value of ``size_setting`` in a recorded method config (None without one)."""
        return cfg.get(self.size_setting) if self.size_setting else None

    # ------------------------------------------------------------------ models

    def load_base(
        self,
        cfg: MethodConfig,
        model_cfg: ModelConfig,
        *,
        dtype: str,
        overrides: Mapping[str, Any] | None = None,
    ) -> paddle.nn.Layer:
        """The base model this method trains on (QLoRA quantizes while loading);
        ``overrides``: model-config values set at construction (recompute details)."""
        return load_model(model_cfg, dtype, overrides)

    def apply(
        self, model: paddle.nn.Layer, cfg: MethodConfig, model_cfg: ModelConfig
    ) -> paddle.nn.Layer:
        raise NotImplementedError

    def save_final(self, trainer: Trainer, model: paddle.nn.Layer, out_dir: Path) -> None:
        """Write a run's ``final/``: the Trainer's save, then ``after_save`` on rank 0."""
        trainer.save_model(str(out_dir))
        if trainer.args.process_index <= 0:
            self.after_save(model, out_dir)

    def after_save(self, model: paddle.nn.Layer, out_dir: Path) -> None:
        """Complete what ``Trainer.save_model`` wrote into ``out_dir`` (main process only)."""

    def save(self, model: paddle.nn.Layer, out_dir: Path) -> None:
        """Single-process save outside a Trainer: the same files a run's ``final/`` holds."""
        model.save_pretrained(str(out_dir))
        self.after_save(model, out_dir)

    def load(
        self, base: paddle.nn.Layer, trained_dir: Path, cfg: MethodConfig | None = None
    ) -> paddle.nn.Layer:
        """Rebuild the trained model on ``base`` from ``trained_dir`` alone (cfg optional)."""
        raise NotImplementedError

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        """Return a plain model whose weights absorb the adapter."""
        raise NotImplementedError


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    """Remove a method (for tests that register one of their own)."""
    _METHODS.pop(name, None)


def registered_methods() -> dict[str, type[Method]]:
    return dict(_METHODS)
