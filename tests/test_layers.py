"""The package's shape: imports form layers with no cycles, Hydra stays in the top layer, the speed switches
are set in one module, and the functions of the training path stay short."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "xnorpp"
# lowest first: a module may import its own layer's modules and those below, never above
LAYERS: list[tuple[str, ...]] = [
    ("xnorpp.registry", "xnorpp.resolvers", "xnorpp.stats"),
    ("xnorpp.nn",),
    ("xnorpp.models", "xnorpp.model_summary", "xnorpp.export"),
    ("xnorpp.data", "xnorpp.track"),
    ("xnorpp.engine",),
    ("xnorpp.accel", "xnorpp"),  # the package's root: public names, library speed defaults
    (
        "xnorpp.bench",
        "xnorpp.bench_loader",
        "xnorpp.job",
        "xnorpp.config_source",
        "xnorpp.run",
        "xnorpp.stages",
        "xnorpp.report",
    ),
]
HYDRA_FREE = ("xnorpp.registry", "xnorpp.nn", "xnorpp.models", "xnorpp.data", "xnorpp.track", "xnorpp.engine",
              "xnorpp.accel", "xnorpp.export", "xnorpp.model_summary")  # fmt: skip
TRAINING_PATH = ("xnorpp.run", "xnorpp.stages", "xnorpp.job", "xnorpp.accel", "xnorpp.registry", "xnorpp.engine", "xnorpp.track",
                 "xnorpp.data", "xnorpp.models", "xnorpp.nn")  # fmt: skip
MAX_FUNCTION_LINES = 60  # signature and body; the docstring not counted
SWITCHES = ("set_kernels", "set_int8_conv", "set_malloc_policy", "set_jemalloc_decay", "set_malloc_thresholds",
            "warm_up_fused")  # fmt: skip


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imports(name: str) -> set[str]:
    """The modules ``name`` imports (anywhere in it): package modules by their dotted name, others as written."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return found - {name}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes if p != "xnorpp") or (
        "xnorpp" in prefixes and name == "xnorpp"
    )


def _layer(name: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) if _within(name, layer)]
    assert found, f"{name} is in no layer: add it to LAYERS"
    return found[0]


def test_imports_form_layers() -> None:
    upward = [
        f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
        for name in MODULES
        for dep in _imports(name)
        if dep in MODULES and _layer(dep) > _layer(name)
    ]
    assert not upward, "\n".join(upward)


def test_package_imports_have_no_cycles() -> None:
    graph = {name: {d for d in _imports(name) if d in MODULES} for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path, node, dep]
            if dep not in state and (cycle := visit(dep, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        cycle = None if name in state else visit(name, [])
        assert cycle is None, " -> ".join(cycle)


def test_hydra_is_imported_only_by_the_top_layer() -> None:
    offenders = [
        n for n in MODULES if _within(n, HYDRA_FREE) and any(d.split(".")[0] == "hydra" for d in _imports(n))
    ]
    assert not offenders, offenders


def test_speed_switches_are_set_by_the_switchboard_only() -> None:
    """Deleting the speed code means deleting :mod:`xnorpp.accel`'s imports and the files behind them."""
    owners = {
        "xnorpp.accel",
        "xnorpp.nn.kernels",
        "xnorpp.nn.int8_conv",
        "xnorpp.nn.fused",
        "xnorpp.engine.memory",
    }
    callers = sorted(
        f"{name}: {node.id if isinstance(node, ast.Name) else node.attr}"
        for name, tree in TREES.items()
        if name not in owners
        for node in ast.walk(tree)
        if isinstance(node, (ast.Name, ast.Attribute))
        and (node.id if isinstance(node, ast.Name) else node.attr) in SWITCHES
    )
    assert not callers, callers


def _length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_functions_of_the_training_path_are_short() -> None:
    long = [
        f"{name}.{node.name}: {_length(node)} lines"
        for name, tree in TREES.items()
        if _within(name, TRAINING_PATH)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_train_reads_as_the_steps_of_a_run() -> None:
    """``run.train`` calls the steps in order: runtime, data, components, resume, tracker, fit, results."""
    (train,) = [n for n in TREES["xnorpp.run"].body if isinstance(n, ast.FunctionDef) and n.name == "train"]
    found = [n for n in ast.walk(train) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
    calls = [n.func.id for n in sorted(found, key=lambda n: (n.lineno, n.col_offset))]
    steps = ["setup_runtime", "build_data", "build_components", "resume", "make_tracker", "make_trainer",
             "fit_or_evaluate", "write_run_results"]  # fmt: skip
    assert [c for c in calls if c in steps] == steps
    assert _length(train) <= 25
