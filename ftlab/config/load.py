"""The one place that touches raw DictConfig: composed config -> typed ``RunConfig``.

Everything downstream receives dataclasses, never DictConfig keys.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ftlab.config.schema import RunConfig


def _asset(name: str) -> str:
    from ftlab.assets import asset_path

    return str(asset_path(name))


def register_resolvers() -> None:
    """``${asset:NAME}`` -> the absolute path of a checkpoint or dataset shipped in ftlab."""
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", _asset)


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Resolve interpolations and convert to dataclasses (method -> its own schema)."""
    register_resolvers()
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig), type(run)
    return run


def to_plain_dict(run: RunConfig) -> dict[str, Any]:
    """A JSON/YAML-ready dict of the typed config (what the resolved config records)."""
    return dataclasses.asdict(run)


def resolved_config_yaml(run: RunConfig, derived: dict[str, Any]) -> str:
    """The resolved config: every setting with interpolations resolved, plus derived values."""
    body = to_plain_dict(run)
    body["derived"] = derived
    return OmegaConf.to_yaml(OmegaConf.create(body))
