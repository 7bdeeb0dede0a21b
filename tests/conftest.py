"""Shared fixtures: composing the real config, a clean Hydra, and paths to assets."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ftlab.config.environment import Environment
from ftlab.config.schema import RunConfig
from ftlab.resolve.compose import register_configs, to_run_config

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
SHARED = REPO.parent / "shared"

CPU = Environment(device="cpu", device_count=2, paddle_version="3.3.1")
GPU8 = Environment(
    device="gpu", device_count=8, paddle_version="3.3.1", gpu_compute_capability=(9, 0)
)


@pytest.fixture(autouse=True)
def clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


def compose_cfg(overrides: list[str] | None = None):
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides or [])


def compose_run(overrides: list[str] | None = None) -> RunConfig:
    return to_run_config(compose_cfg(overrides))


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


class Unpickled(AssertionError):
    """Raised by ``no_unpickling`` when code under test tried to unpickle something."""


@pytest.fixture(scope="module")
def tok():
    """The shipped model's tokenizer with a pad token (a bare sentencepiece tokenizer has
    none; the data tests choose one explicitly)."""
    from paddlenlp.transformers import AutoTokenizer

    from ftlab.assets import asset_path

    t = AutoTokenizer.from_pretrained(str(asset_path("stories260k")))
    t.pad_token = "<unk>"
    return t


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch):
    """Make every way of unpickling raise: ``pickle.load(s)``, ``pickle.Unpickler`` and
    ``paddle.load`` (which unpickles). Code that needs only weights and configs (predict,
    merge) must get through with it in force."""
    import pickle

    import paddle

    def refuse(*args, **kwargs):
        raise Unpickled(f"unpickling attempted: {args[:1]!r}")

    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse(*args)

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(paddle, "load", refuse)
    monkeypatch.setattr(paddle.framework.io, "load", refuse)
    yield
