"""The shape of the code: no import cycle, layers that only look down, and a method that is
wholly one class (a method registered here is handled by validation, plan, export, resume
and the run index with no change anywhere else)."""

from __future__ import annotations

import ast
import copy
import functools
import json
from collections.abc import Iterable
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

# Layers, bottom first: a module may import from its own layer and the layers below, and
# every ftlab import counts (inside functions too: a lazy import is still an edge).
LAYERS: list[tuple[str, ...]] = [
    (  # records and types everything else passes around; no Paddle
        "ftlab",
        "ftlab.errors",
        "ftlab.signals",
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
    (  # building blocks: each knows its own subject and the records above
        "ftlab.models",
        "ftlab.data",
        "ftlab.evaluation",
        "ftlab.distributed",
        "ftlab.convert",
        "ftlab.demo",
        "ftlab.methods",
        # DPO/KTO argument files: written by the preference stages' export hook
        "ftlab.interop.preference_export",
        # which metric ranks checkpoints, how much disk they take, and the MLflow tracker
        # (a sweep's summary logs to its parent run): validation, the trainer arguments, the
        # plan and the run records all ask them
        "ftlab.resolve.best_checkpoint",
        "ftlab.planning.disk",
        "ftlab.training.mlflow_tracker",
        # reading Hugging Face checkpoints: model loading's seam calls them
        "ftlab.interop.hf_layout",
        "ftlab.interop.hf_in",
        "ftlab.interop.hf_tokenizer",
    ),
    ("ftlab.record",),  # runs read back (resume, index, compare, sweeps): ask the methods
    # The Trainer and what it records at every step, below both its users: the stages
    # (their Trainer classes mix it in) and the training run (which drives it).
    ("ftlab.training",),
    ("ftlab.stages",),  # sft, dpo, kto: data, reference model, Trainer, plan and export
    # Composition and validation: ask each method and stage to check its own settings.
    ("ftlab.resolve",),
    ("ftlab.training.run",),  # one training run, prepare -> build -> fit -> finalize
    # Plans, parallel=auto and translations to and from other tools' argument files (the
    # PaddleNLP export reads the validated run and the training arguments).
    ("ftlab.planning", "ftlab.interop"),
    ("ftlab.cli",),  # the commands
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


# Libraries whose import costs a second or prints warnings (Paddle before ftlab's console is
# set up): the one reason to import inside a function.
HEAVY = ("paddle", "paddlenlp", "numpy", "visualdl", "mlflow", "matplotlib")


def _imports(path: Path) -> tuple[set[str], list[tuple[int, list[str]]]]:
    """(names imported at module level, [(line, names) of each import inside a function]),
    ``if TYPE_CHECKING:`` blocks left out."""
    top: set[str] = set()
    inner: list[tuple[int, list[str]]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                names = [child.module, *(f"{child.module}.{a.name}" for a in child.names)]
            else:
                names = []
            if names and in_function:
                inner.append((child.lineno, names))
            elif names:
                top.update(names)
            functions = (ast.FunctionDef, ast.AsyncFunctionDef)
            visit(child, in_function or isinstance(child, functions))

    visit(ast.parse(path.read_text()), False)
    return top, inner


def test_no_module_resolves_names_lazily() -> None:
    """A module ``__getattr__`` hides which module a name comes from (and the edge from the
    import graph): users import from the module that defines the name."""
    lazy = {
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        for node in ast.parse(p.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
    }
    assert lazy == set()


def test_imports_inside_functions_only_defer_a_heavy_library() -> None:
    """An ftlab import inside a function is there to keep a heavy library (``HEAVY``) out of
    a module that does not need it yet, never to dodge a cycle (the layers forbid cycles)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    imports = {name: _imports(path) for name, path in modules.items()}

    def loads_heavy(names: Iterable[str]) -> bool:
        return any(n.split(".")[0] in HEAVY for n in names)

    def loads(module: str) -> set[str]:
        """The ftlab modules importing ``module`` runs: its imports and its packages."""
        parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        return {t for t in imports[module][0] | parents if t in modules and t != module}

    # Modules whose import loads a heavy library (directly or through ftlab), as a fixed
    # point: a package and its submodules may import each other.
    heavy_modules = {m for m in modules if loads_heavy(imports[m][0])}
    grew = True
    while grew:
        more = {m for m in modules if m not in heavy_modules and loads(m) & heavy_modules}
        heavy_modules |= more
        grew = bool(more)

    def heavy(module: str) -> bool:
        return module in heavy_modules

    needless = [
        f"{modules[m].relative_to(REPO)}:{line} imports {', '.join(names[1:] or names)}"
        for m, (_, inner) in imports.items()
        for line, names in inner
        if any(n in modules for n in names)
        and (heavy(m) or not (loads_heavy(names) or any(heavy(n) for n in names if n in modules)))
    ]
    assert needless == []


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
