"""The package's shape: imports point one way. Every import counts, the ones inside functions too
(they only defer the cost of loading a module, not the dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlxinfer"


def modules() -> dict[str, Path]:
    """mlxinfer's modules by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that `name` imports. `from . import x` names the submodule x
    (or the package, for a name defined there); importing a package's submodule loads the
    package too, which is not counted: a parent package is loaded by any of its modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = (
                ".".join(base + [node.module] if node.module else base)
                if node.level
                else node.module
            )
            submodules = {f"{module}.{a.name}" for a in node.names} & known.keys()
            found |= submodules or ({module} & known.keys())
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & known.keys()
    return found - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    """chat.py and cli.py imported each other (the package's only cycle) before the CLI became a
    package whose commands share cli/options.py."""
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "mlxinfer.cli.options" in graph["mlxinfer.cli.chat"]  # the parser sees imports
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The layers of ARCHITECTURE.md, lowest first: a module may import its own layer and those below.
LAYERS = [
    ["backend", "streams", "masks", "cpu_kernels", "ops"],
    [
        "config",
        "rope",
        "norms",
        "attention",
        "mlp",
        "moe",
        "model",
        "cache",
        "batch_cache",
        "parallel",
    ],
    ["chat_template", "tokenizer", "gguf", "gguf_quants", "loading"],
    ["steps", "sampling", "speculative", "responses", "metrics", "conversation"],
    ["request", "prefix_cache", "runner", "scheduler", "generate", "engine", "engine_ranks"],
    ["inspect", "bench", "server"],
    ["cli", "__main__"],
]


def layer_of(module: str) -> int:
    """The layer of `mlxinfer.x` or `mlxinfer.x.y` (a subpackage is one unit). The package's
    __init__ (the BLAS set-up that must run first, the version, the public API) is loaded before
    any of its modules, so taking a name from it is no upward import: layer -1."""
    if module == "mlxinfer":
        return -1
    unit = module.split(".")[1]
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def test_every_module_has_a_layer():
    units = {name.split(".")[1] for name in modules() if name != "mlxinfer"}
    assert units == {unit for names in LAYERS for unit in names}


def test_imports_point_down_the_layers():
    """A module imports only its own layer and those below (ARCHITECTURE.md): the kernels know
    nothing of the caches, the model nothing of sampling, generation nothing of the tools. The
    masks lived in cache.py, which the op sets imported."""
    known = modules()
    upward = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, path in known.items()
        if name != "mlxinfer"  # the public API: it exports from every layer
        for target in imports(name, path, known)
        if layer_of(target) > layer_of(name)
    ]
    assert upward == []


def test_all_sql_is_in_the_runs_database_module():
    """The runs database's schema and queries live in one place (bench/db.py); the sweep runner,
    the background jobs and the dashboard ask it (they ran their own SELECTs)."""
    root = PACKAGE.parent
    outside = [
        f"{path.relative_to(root)}:{number}"
        for path in [*PACKAGE.rglob("*.py"), *(root / "dashboard").rglob("*.py")]
        if path != PACKAGE / "bench" / "db.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if ".execute(" in line or "executemany(" in line
    ]
    assert outside == []
