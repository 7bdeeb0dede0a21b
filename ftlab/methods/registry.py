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

    from ftlab.config.schema import ModelConfig


class Method:
    """How one method turns a base model into a trainable one, saves, reloads and merges.

    ``merge_unsupported`` is None for mergeable methods, else the reason a merge cannot
    exist (prefix tuning and ReFT add computation that no weight matrix can absorb).
    """

    name: ClassVar[str]
    schema: ClassVar[type[schema.MethodConfig]]
    merge_unsupported: ClassVar[str | None] = None
    # Methods whose PaddleNLP implementation supports tensor-parallel layers.
    supports_tensor_parallel: ClassVar[bool] = True

    def apply(self, model: paddle.nn.Layer, cfg: Any, model_cfg: ModelConfig) -> paddle.nn.Layer:
        raise NotImplementedError

    def save(self, model: paddle.nn.Layer, out_dir: Path) -> None:
        """Write what ``load`` needs (the adapter only, or the whole model for ``full``)."""
        model.save_pretrained(str(out_dir))

    def load(self, base: paddle.nn.Layer, trained_dir: Path, cfg: Any) -> paddle.nn.Layer:
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
    from ftlab.methods import full, lora  # noqa: F401


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _METHODS[name]()
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_METHODS)}") from None


def method_schemas() -> dict[str, type[schema.MethodConfig]]:
    _load_builtin_methods()
    return {name: cls.schema for name, cls in _METHODS.items()}
