"""Composition: the schemas in Hydra's ConfigStore, and the composed DictConfig -> ``RunConfig``.

YAML options name their schema first in their defaults list (``- /base_lora@_here_``),
which makes OmegaConf type-check and reject unknown keys while Hydra composes the run.
The schemas are stored outside every config group (top-level ``base_<name>`` entries), so
they never appear among a group's options in ``ftlab --help``, in Hydra's error messages or
in shell completion. This is the one place that touches raw DictConfig: everything
downstream receives dataclasses.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from ftlab.assets import asset_path
from ftlab.config import schema
from ftlab.config.derived import Derived
from ftlab.distributed.slurm import slurm_gpus_per_node, slurm_nodes
from ftlab.methods.catalog import method_schemas
from ftlab.models.config_json import model_label, resolve_model
from ftlab.record.rundir import claim_new_dir
from ftlab.stages.catalog import stage_schemas

# The schema of each config group whose options share one; a method's and a stage's
# schema is its own (``base_<method>``, ``base_<stage>``). An option YAML in
# conf/<group>/ starts with ``defaults: [/base_<group>@_here_, _self_]``.
GROUP_SCHEMAS: dict[str, type] = {
    "model": schema.ModelConfig,
    "data": schema.DataConfig,
    "parallel": schema.ParallelConfig,
    "precision": schema.PrecisionConfig,
}

_registered = False


def schema_entries() -> dict[str, type]:
    """``base_<name>`` -> schema: what the ConfigStore holds, outside every group."""
    entries: dict[str, type] = {"base_run": schema.RunConfig}
    for name, node in [
        *GROUP_SCHEMAS.items(),
        *method_schemas().items(),
        *stage_schemas().items(),
    ]:
        if f"base_{name}" in entries:
            raise ValueError(f"two schemas would be stored as base_{name}")
        entries[f"base_{name}"] = node
    return entries


def register_configs() -> None:
    """Idempotent: the CLI, the tests and the sweep runner all call it.

    Also registers ``${new_dir:PATH}``, which names every run and sweep dir
    (``conf/train.yaml``): it creates ``PATH`` exclusively and returns the dir it made.
    """
    global _registered
    if _registered:
        return
    if not OmegaConf.has_resolver("new_dir"):
        OmegaConf.register_new_resolver("new_dir", claim_new_dir, use_cache=True)
    cs = ConfigStore.instance()
    for name, node in schema_entries().items():
        cs.store(name=name, node=node)
    register_resolvers()  # before Hydra resolves the run dir's name
    _registered = True


def _asset(name: str) -> str:
    return str(asset_path(name))


def _model_label(name: Any, name_or_path: Any) -> str:
    return str(model_label(name, name_or_path))


def _stage_suffix(stage: str) -> str:
    return "" if stage == "sft" else f"_{stage}"


def register_resolvers() -> None:
    """``${asset:NAME}`` -> the absolute path of a checkpoint or dataset shipped in ftlab;
    ``${model_label:NAME,PATH}`` -> the model's run-dir label (NAME, else PATH's last part);
    ``${stage_suffix:NAME}`` -> "" for sft, "_dpo" etc. (run dir names);
    ``${slurm_nodes:...}``, ``${slurm_gpus_per_node:...}`` -> the SLURM allocation of
    ``hydra/launcher=slurm_multinode`` (``ftlab.distributed.slurm``)."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)
    if not OmegaConf.has_resolver("model_label"):
        OmegaConf.register_new_resolver("model_label", _model_label)
    if not OmegaConf.has_resolver("stage_suffix"):
        OmegaConf.register_new_resolver("stage_suffix", _stage_suffix)
    if not OmegaConf.has_resolver("slurm_nodes"):
        OmegaConf.register_new_resolver("slurm_nodes", slurm_nodes)
    if not OmegaConf.has_resolver("slurm_gpus_per_node"):
        OmegaConf.register_new_resolver("slurm_gpus_per_node", slurm_gpus_per_node)


def to_run_config(cfg: DictConfig) -> schema.RunConfig:
    """Resolve interpolations and convert to dataclasses (method -> its own schema); the
    model's family, architecture numbers, label and LoRA targets are completed from its
    directory's config.json or its model option (``ftlab.models.config_json``)."""
    register_resolvers()
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, schema.RunConfig), type(run)
    run.model = resolve_model(run.model)
    return run


def to_plain_dict(run: schema.RunConfig) -> dict[str, Any]:
    """A JSON/YAML-ready dict of the typed config (what the resolved config records)."""
    return dataclasses.asdict(run)


def resolved_config_yaml(run: schema.RunConfig, derived: Derived | dict[str, Any]) -> str:
    """The resolved config: every setting with interpolations resolved, plus derived values."""
    body = to_plain_dict(run)
    body["derived"] = derived.to_dict() if isinstance(derived, Derived) else dict(derived)
    return OmegaConf.to_yaml(OmegaConf.create(body))
