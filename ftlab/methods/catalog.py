"""The methods ftlab ships, loaded into the registry: what callers ask for a method by name.

Adding a built-in method: its module (schema + ``@register_method`` class), one import
below, and its YAML in ``conf/method/``.
"""

from __future__ import annotations

from ftlab.config.schema import MethodConfig
from ftlab.methods import full, lokr, lora, prefix, qlora, reft, vera  # noqa: F401 (register)
from ftlab.methods.registry import Method, registered_methods


def get_method(name: str) -> Method:
    methods = registered_methods()
    try:
        return methods[name]()
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(methods)}") from None


def method_schemas() -> dict[str, type[MethodConfig]]:
    return {name: cls.schema for name, cls in registered_methods().items()}
