"""Register every schema in Hydra's ConfigStore.

YAML options name their schema first in their defaults list (``- base_lora``), which
makes OmegaConf type-check and reject unknown keys while Hydra composes the run.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from ftlab.config import schema
from ftlab.methods.registry import method_schemas

_registered = False


def register_configs() -> None:
    """Idempotent: the CLI, the tests and the sweep runner all call it."""
    global _registered
    if _registered:
        return
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=schema.RunConfig)
    cs.store(group="model", name="base_model", node=schema.ModelConfig)
    cs.store(group="data", name="base_data", node=schema.DataConfig)
    cs.store(group="parallel", name="base_parallel", node=schema.ParallelConfig)
    cs.store(group="precision", name="base_precision", node=schema.PrecisionConfig)
    for name, node in method_schemas().items():
        cs.store(group="method", name=f"base_{name}", node=node)
    _registered = True
