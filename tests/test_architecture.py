"""The shape of the code: no import cycle, layers that only look down, and a method that is
wholly one class (a method registered here is handled by validation, plan, export, resume
and the run index with no change anywhere else)."""

from __future__ import annotations

import ast
import copy
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fake_runs import make_run
from helpers import CPU, REPO, compose_run
from hydra.core.config_store import ConfigStore

from ftlab.config.schema import MethodConfig
from ftlab.errors import ConfigError
from ftlab.methods.registry import AdapterPlan, Method, register_method, unregister_method

pytestmark = pytest.mark.fast  # needs no Paddle: runs in make test-fast

PACKAGE = REPO / "ftlab"

# Layers, bottom first: a module may import from its own layer and the layers below.
LAYERS: list[tuple[str, ...]] = [
    (  # records and types everything else passes around; no Paddle
        "ftlab",
        "ftlab.errors",
        "ftlab.assets",
        "ftlab.config",
        "ftlab.models.families",
        "ftlab.models.arch",
        "ftlab.models.quant.algos",
        "ftlab.record.rundir",
        "ftlab.record.summary",
        "ftlab.record.status",
        "ftlab.record.provenance",
    ),
    (  # building blocks
        "ftlab.models",
        "ftlab.data",
        "ftlab.evaluation",
        "ftlab.distributed",
        "ftlab.convert",
        "ftlab.demo",
    ),
    ("ftlab.methods",),
    (  # what runs a job, and reading runs back (asks methods about their settings)
        "ftlab.stages",
        "ftlab.resolve",
        "ftlab.training",
        "ftlab.planning",
        "ftlab.interop",
        "ftlab.record",
    ),
    ("ftlab.cli",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every ftlab module -> the ftlab modules it imports, at any depth of the file (imports
    inside functions count: they are cycles too), except ``if TYPE_CHECKING:`` blocks."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int:
    """The layer of the longest prefix that names ``module`` (``ftlab.models.arch`` is in
    layer 0 although ``ftlab.models`` is in layer 1)."""
    best, layer = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), i
    assert layer >= 0, f"{module} is in no layer"
    return layer


def test_no_import_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 60  # the walk found the package
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_modules_import_only_their_layer_and_below() -> None:
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in import_graph().items()
        for t in targets
        if layer_of(t) > layer_of(m)
    ]
    assert upward == []


# --------------------------------------------------------------------------- a new method


@dataclass
class TinyMethodConfig(MethodConfig):
    name: str = "tiny"
    tiny_size: int = 3  # trainable numbers per decoder layer and hidden unit


class Tiny(Method):
    """A made-up method: every question about it is answered here, nowhere else."""

    name = "tiny"
    schema = TinyMethodConfig
    fixed_on_resume = ("tiny_size",)
    size_setting = "tiny_size"

    def check(self, run: Any, env: Any) -> None:
        if run.method.tiny_size < 1:
            raise ConfigError(f"method.tiny_size={run.method.tiny_size}: must be >= 1.")

    def derived(self, cfg: Any) -> dict[str, Any]:
        return {"tiny_scale": 1.0 / cfg.tiny_size}

    def plan(self, run: Any) -> AdapterPlan:
        per_layer = run.method.tiny_size * run.model.arch.hidden_size
        return AdapterPlan(
            adapter=per_layer * run.model.arch.num_hidden_layers,
            adapter_per_layer=per_layer,
            details={"tiny_size": run.method.tiny_size},
            lines=[f"adapter        tiny of size {run.method.tiny_size}"],
        )

    def export(self, run: Any, notes: list[str]) -> dict[str, Any]:
        notes.append("tiny: run_finetune.py knows no tiny method; exported as LoRA.")
        return {"lora": True, "lora_rank": run.method.tiny_size}


@pytest.fixture
def tiny() -> Any:
    register_method(Tiny)
    ConfigStore.instance().store(group="method", name="tiny", node=TinyMethodConfig)
    yield Tiny
    unregister_method("tiny")


def test_a_registered_method_is_validated_planned_and_exported(tiny: Any, tmp_path: Path) -> None:
    from ftlab.interop.paddlenlp_export import export_run_finetune
    from ftlab.planning.plan import make_plan
    from ftlab.resolve.validate import validate

    run = compose_run(["method=tiny", "method.tiny_size=2"])
    assert isinstance(run.method, TinyMethodConfig)
    derived = validate(run, CPU)
    assert derived["tiny_scale"] == 0.5 and derived.method == {"tiny_scale": 0.5}
    with pytest.raises(ConfigError, match="method.tiny_size=0: must be >= 1"):
        validate(compose_run(["method=tiny", "method.tiny_size=0"]), CPU)
    with pytest.raises(ConfigError, match="method=tiny with parallel=pp2.*no pipeline-parallel"):
        validate(compose_run(["method=tiny", "parallel=pp2", "parallel.cpu_emulation=true"]), CPU)

    plan = make_plan(run, derived, "cpu")
    assert plan["parameters"]["trainable"] == 2 * 64 * 5  # tiny_size x hidden x layers
    assert plan["parameters"]["total"] == 260_032 + 2 * 64 * 5
    assert plan["method"] == {"name": "tiny", "tiny_size": 2}
    assert plan["method_lines"] == ["adapter        tiny of size 2"]

    out = export_run_finetune(run, derived, tmp_path)
    assert out["arguments"]["lora"] is True and out["arguments"]["lora_rank"] == 2
    assert "tiny: run_finetune.py knows no tiny method; exported as LoRA." in out["notes"]
    assert json.loads((tmp_path / "run_finetune.json").read_text()) == out["arguments"]


def test_a_registered_method_fixes_its_size_on_resume_and_names_it_in_run_lists(
    tiny: Any, tmp_path: Path
) -> None:
    from ftlab.record.index import read_run
    from ftlab.record.resume import check_resume_config
    from ftlab.resolve.compose import resolved_config_yaml, to_plain_dict
    from ftlab.resolve.validate import validate

    run = compose_run(["method=tiny", "method.tiny_size=2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "resolved_config.yaml").write_text(resolved_config_yaml(run, validate(run, CPU)))
    grown = compose_run(["method=tiny", "method.tiny_size=5"])
    with pytest.raises(ConfigError, match=r"cannot change on resume.*method.tiny_size: 2 -> 5"):
        check_resume_config(run_dir, to_plain_dict(grown))
    slower = compose_run(["method=tiny", "method.tiny_size=2", "train.learning_rate=1e-3"])
    assert check_resume_config(run_dir, to_plain_dict(slower)) == [
        "train.learning_rate: 0.01 -> 0.001"
    ]

    listed = make_run(
        tmp_path / "listed", ["method=tiny", "method.tiny_size=7"], "2026-01-01T10:00:00"
    )
    assert read_run(listed).rank == 7


def test_a_method_without_a_plan_is_refused_by_name(tiny: Any, monkeypatch: Any) -> None:
    from ftlab.planning.plan import make_plan
    from ftlab.resolve.validate import validate

    monkeypatch.delattr(Tiny, "plan")  # back to Method.plan
    run = compose_run(["method=tiny"])
    with pytest.raises(ConfigError, match="no parameter model for method=tiny"):
        make_plan(run, validate(run, CPU), "cpu")


# --------------------------------------------------------------------------- every method

# A setting of each built-in method that shapes its trained tensors, and a changed value.
SIZE_CHANGES = [
    ("lora", "lora_rank", 4),
    ("lora", "target_modules", [".*q_proj"]),
    ("lora", "use_mora", True),
    ("qlora", "lora_rank", 16),
    ("qlora", "quant_algo", "int8"),
    ("qlora", "quant_block_size", 128),
    ("qlora", "double_quant", True),
    ("vera", "vera_rank", 32),
    ("vera", "vera_seed", 1),
    ("vera", "target_modules", [".*q_proj"]),
    ("lokr", "lokr_dim", 4),
    ("lokr", "factor", 4),
    ("lokr", "decompose_both", True),
    ("prefix", "num_prefix_tokens", 8),
    ("prefix", "prefix_projection", True),
    ("reft", "reft_rank", 8),
    ("reft", "reft_layers", [0, 1]),
]


@functools.cache
def recorded(method: str) -> tuple[str, dict[str, Any]]:
    """(the resolved config a ``method`` run records, its settings as a plain dict)."""
    from ftlab.resolve.compose import resolved_config_yaml, to_plain_dict

    run = compose_run([f"method={method}"])
    return resolved_config_yaml(run, {}), to_plain_dict(run)


@pytest.mark.parametrize(("method", "key", "value"), SIZE_CHANGES)
def test_resume_refuses_a_changed_adapter_size_for_every_method(
    method: str, key: str, value: Any, tmp_path: Path
) -> None:
    from ftlab.record.resume import check_resume_config

    resolved, settings = recorded(method)
    (tmp_path / "resolved_config.yaml").write_text(resolved)
    changed = copy.deepcopy(settings)
    assert changed["method"][key] != value
    changed["method"][key] = value
    with pytest.raises(ConfigError, match=f"cannot change on resume.*method.{key}:"):
        check_resume_config(tmp_path, changed)
