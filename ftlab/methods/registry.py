"""The method registry: one entry per PEFT method (or full fine-tuning).

Adding a method is one YAML in ``conf/method/`` plus one ``@register_method`` class. This
module must stay importable without Paddle: config composition runs before any heavy
import, so method modules import Paddle inside their functions only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ftlab.config import schema

if TYPE_CHECKING:
    import paddle

    from ftlab.config.schema import ModelConfig, RunConfig


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
    schema: ClassVar[type[schema.MethodConfig]]
    merge_unsupported: ClassVar[str | None] = None
    # Methods whose PaddleNLP implementation supports tensor-parallel layers.
    supports_tensor_parallel: ClassVar[bool] = True
    # Methods that work on PaddleNLP's pipeline models (``...ForCausalLMPipe``).
    supports_pipeline_parallel: ClassVar[bool] = False
    # Whether PaddleNLP's unified checkpoint can save this method's model. It handles
    # plain models, LoRAModel and PrefixModelForCausalLM only; other wrappers raise there
    # and are saved through their own ``save_pretrained`` instead.
    unified_checkpoint: ClassVar[bool] = True

    def check(self, run: RunConfig) -> None:
        """Reject settings this method cannot honour (raise ``ConfigError``)."""

    def apply(self, model: paddle.nn.Layer, cfg: Any, model_cfg: ModelConfig) -> paddle.nn.Layer:
        raise NotImplementedError

    def load_base(self, model_cfg: ModelConfig, dtype: str, cfg: Any) -> paddle.nn.Layer:
        """The base model this method trains on (QLoRA quantizes while loading)."""
        from ftlab.models import load_model

        return load_model(model_cfg, dtype)

    def save_final(self, trainer: Any, model: paddle.nn.Layer, out_dir: Path) -> None:
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

    def load(self, base: paddle.nn.Layer, trained_dir: Path, cfg: Any = None) -> paddle.nn.Layer:
        """Rebuild the trained model on ``base`` from ``trained_dir`` alone (cfg optional)."""
        raise NotImplementedError

    def merge(self, model: paddle.nn.Layer) -> paddle.nn.Layer:
        """Return a plain model whose weights absorb the adapter."""
        raise NotImplementedError

    def derived(self, cfg: Any) -> dict[str, Any]:
        """Values computed from the settings, written into the resolved config."""
        return {}


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    _METHODS[cls.name] = cls
    return cls


def _load_builtin_methods() -> None:
    # Imported for their @register_method side effect; light modules (no Paddle import).
    from ftlab.methods import full, lokr, lora, prefix, qlora, reft, vera  # noqa: F401


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _METHODS[name]()
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_METHODS)}") from None


def method_schemas() -> dict[str, type[schema.MethodConfig]]:
    _load_builtin_methods()
    return {name: cls.schema for name, cls in _METHODS.items()}
