"""The stages ftlab ships, loaded into the registry: what callers ask for a stage by name.

Adding a built-in stage: its module (schema + ``@register_stage`` class), one import
below, and its YAML in ``conf/stage/``.
"""

from __future__ import annotations

from ftlab.config.schema import StageConfig
from ftlab.stages import dpo, grpo, kto, rm, sft  # noqa: F401 (register)
from ftlab.stages.registry import Stage, registered_stages


def get_stage(name: str) -> Stage:
    stages = registered_stages()
    try:
        return stages[name]()
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; registered: {sorted(stages)}") from None


def stage_schemas() -> dict[str, type[StageConfig]]:
    return {name: cls.schema for name, cls in registered_stages().items()}
