"""Shared fixtures: a clean Hydra, the shipped tokenizer, four demo examples, no unpickling;
and the guard of ``make test-fast`` (``-m fast``: the tests that need no Paddle).
Shared functions and constants live in ``helpers.py``."""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest

# Re-exported: tests written before helpers.py (on other branches too) import these from conftest.
# Importing helpers also chose MKL's code path for this process, before Paddle loads.
from helpers import (  # noqa: F401
    CONF_DIR,
    CPU,
    DEMO,
    GPU8,
    REPO,
    SHARED,
    compose_cfg,
    compose_run,
    group_options,
)
from hydra.core.global_hydra import GlobalHydra

# --------------------------------------------------------------------------- make test (xdist)
# The files that take longest, longest first (seconds of each file's tests under ``make
# test``, 2026-12-03, quiet, after the forked ftlab runs of ``helpers.run_ftlab_forked``:
# distributed 70, e2e 48, methods 24, pickle_refusal 23, reliability 22, resume 20,
# grpo_stage 16, hf_out 14, stages 14, hf_families 14; the other files 219 s together).
# Under ``-n 2 --dist loadfile --no-loadscope-reorder`` each file runs on one worker (its
# module fixtures once) and the long files start first, so no long file is left for the end.
LONGEST_FIRST = [
    "test_distributed.py",
    "test_e2e.py",
    "test_methods.py",
    "test_pickle_refusal.py",
    "test_reliability.py",
    "test_resume.py",
    "test_grpo_stage.py",
    "test_hf_out.py",
    "test_stages.py",
    "test_hf_families.py",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: every worker sorts alike
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# --------------------------------------------------------------------------- make test-fast
# ``-m fast`` selects the tests marked ``fast``: compose, validate, plan, families, auto,
# launch commands, import/export refusals, help, run records: everything that needs no Paddle.
# Importing Paddle (and PaddleNLP) takes ~10 s of the minute that target is meant to take, so
# in that mode a test file is only collected if it holds a fast test, and a test (or a
# collected module) that imports Paddle fails, naming where the import came from.


def fast_only(config: pytest.Config) -> bool:
    """Whether the run selects fast tests (``-m fast``, ``-m "fast and not slow"``)."""
    return re.search(r"(?<!not )\bfast\b", config.getoption("markexpr", "") or "") is not None


class PaddleImportWatch(importlib.abc.MetaPathFinder):
    """Remembers where ``paddle`` was first imported from; lets the import proceed."""

    def __init__(self) -> None:
        self.where: str | None = None
        self.during = "collection"
        self.reported = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "paddle" and self.where is None:
            stack = [
                f
                for f in traceback.extract_stack()[:-1]  # without this frame
                if not f.filename.startswith("<frozen")
                and "/_pytest/" not in f.filename
                and "/pluggy/" not in f.filename
            ]
            self.where = "".join(traceback.format_list(stack[-8:]))
            self.during = os.environ.get("PYTEST_CURRENT_TEST", "collection")
        return None


PADDLE_WATCH = PaddleImportWatch()


def pytest_configure(config: pytest.Config) -> None:
    if fast_only(config) and "paddle" not in sys.modules:
        sys.meta_path.insert(0, PADDLE_WATCH)
    pin_worker_to_one_core(config)


def pin_worker_to_one_core(config: pytest.Config) -> None:
    """Under ``-n N`` with at least N cores, worker ``gwK`` computes on core K alone, and so
    do the ftlab processes it starts (they inherit the affinity).

    Why: ``launch.cpu_threads=auto`` gives every ftlab process one math thread per core it
    may use; unpinned, two workers each running an ftlab process put 4 busy threads on 2
    cores, and Paddle's idle math threads spin while they wait for a core. Pinned, each
    process sees one core and takes one thread (``auto`` still decides, as for a user whose
    job is given one core)."""
    info = getattr(config, "workerinput", None)
    if info is None or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    count, worker = int(info.get("workercount", 0)), str(info.get("workerid", ""))
    if not worker.startswith("gw") or not 1 < count <= len(cores):
        return
    os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Under ``-m fast``, a test file without a fast test is not even imported."""
    if fast_only(config) and collection_path.suffix == ".py":
        if collection_path.name.startswith("test_"):
            return "mark.fast" not in collection_path.read_text()
    return None


@pytest.fixture(autouse=True)
def fast_tests_import_no_paddle(request: pytest.FixtureRequest):
    yield
    if fast_only(request.config) and "paddle" in sys.modules and not PADDLE_WATCH.reported:
        PADDLE_WATCH.reported = True
        pytest.fail(
            f"make test-fast must not import paddle; it was imported during {PADDLE_WATCH.during}"
            f" from:\n{PADDLE_WATCH.where}",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def clean_hydra():
    GlobalHydra.instance().clear()
    yield
    GlobalHydra.instance().clear()


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


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The shipped model's tokenizer, loaded as ftlab loads it."""
    from ftlab.models.loading import load_tokenizer

    return load_tokenizer(compose_run().model)


@pytest.fixture(scope="module")
def examples(tokenizer: Any) -> list[dict[str, list[int]]]:
    """Four demo stories, label-shifted as PaddleNLP's causal-LM loss expects."""
    lines = (DEMO / "train.json").read_text().splitlines()[:4]
    out = []

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for rec in map(json.loads, lines):
        src = [tokenizer.bos_token_id, *encode(rec["src"])]
        tgt = [*encode(rec["tgt"]), tokenizer.eos_token_id]
        seq, labels = src + tgt, [-100] * len(src) + tgt
        out.append({"input_ids": seq[:-1], "labels": labels[1:]})
    return out
