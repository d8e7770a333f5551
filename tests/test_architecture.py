"""The package's layers, as docs/architecture.md draws them: no import circle between modules, and no
module importing a layer below it in this list (lazy imports inside functions count too: a circle hidden
in a function is still a circle)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cbir"
# top to bottom: a module may import its own layer and the layers above it, never one below
LAYERS = [
    ("core", ["cbir", "cbir.layout", "cbir.artifacts", "cbir.checkpoints", "cbir.images", "cbir.device",
              "cbir.vectors", "cbir.weights", "cbir.status", "cbir.engines"]),
    ("datasets", ["cbir.datasets"]),
    ("metrics", ["cbir.metrics"]),
    ("detection", ["cbir.detection"]),
    ("encoders", ["cbir.encoders"]),
    ("training", ["cbir.training"]),
    ("retrieval", ["cbir.retrieval"]),
    ("evaluation", ["cbir.evaluation"]),
    ("front ends", ["cbir.pipeline", "cbir.ui", "cbir.service", "cbir.cli", "cbir.__main__"]),
]


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def layer_of(module: str) -> int:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} belongs to no layer of docs/architecture.md; add it there and here"
    return best[0]


@pytest.fixture(scope="module")
def graph():
    files = module_files()
    return {name: imports(name, path, set(files)) for name, path in files.items()}


def test_no_module_imports_a_lower_layer(graph):
    wrong = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
             for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_circle(graph):
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while not component or w != v:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The graph must catch an import inside a function, written relative to a sub-package."""
    (tmp_path / "cbir" / "encoders").mkdir(parents=True)
    path = tmp_path / "cbir" / "encoders" / "x.py"
    path.write_text("def f():\n    from ..training.head import load_head\n    from . import cnn\n")
    known = {"cbir.training.head", "cbir.encoders", "cbir.encoders.cnn", "cbir.encoders.x"}
    assert imports("cbir.encoders.x", path, known) == {"cbir.training.head", "cbir.encoders.cnn"}
    assert layer_of("cbir.training.head") > layer_of("cbir.encoders.x")
