"""The package map of docs/ARCHITECTURE.md, checked from the source (parsed, never imported): no module imports
from a layer above its own, analysis and report stay torch-free, and the project's modules hold no import circle.
Imports inside functions count too: a lazy import is still a dependency."""
from __future__ import annotations

import ast
from collections.abc import Collection
from pathlib import Path

import pytest

from data_prep.paths import REPO_ROOT

PACKAGES = ("data_prep", "replication", "analysis", "report", "ptr", "bench")
# Lowest first; a module may import from its own layer and the ones below. The first matching prefix decides.
LAYERS = [
    ("data_prep", 0),
    ("replication.config", 1), ("replication.cubes", 1), ("replication.provenance", 1), ("replication.shapes", 1),
    ("replication.models", 2), ("replication.mechanics", 2), ("replication.memory", 2),
    ("replication.experiments", 3), ("replication.posttrain", 3), ("replication.sweeps", 3),
    ("replication", 1),  # the package itself (its __init__)
    ("analysis", 4), ("report", 5), ("ptr", 6), ("bench", 7),
]
LAYER_NAMES = {0: "data_prep", 1: "replication base (config, cubes, provenance, shapes)",
               2: "replication.models / mechanics / memory", 3: "replication.experiments / posttrain / sweeps",
               4: "analysis", 5: "report", 6: "ptr", 7: "bench"}
CUBE_READERS = ("analysis", "report")  # they read cubes: replication's base layer only, never its torch modules
# Never import torch: the cube readers and replication's base layer (which analysis imports).
TORCH_FREE = CUBE_READERS + ("replication.config", "replication.cubes", "replication.provenance", "replication.shapes")
TORCH_PACKAGES = ("torch", "transformers", "nnsight")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path = REPO_ROOT) -> dict[str, Path]:
    """{dotted module name: file} of every module of the project's packages."""
    return {module_name(path, root): path for package in PACKAGES if (root / package).is_dir()
            for path in sorted((root / package).rglob("*.py"))}


def imported_names(path: Path, name: str, modules: Collection[str]) -> set[str]:
    """Every module that `path` (module `name`) imports, anywhere in the file. `from a import b` imports the
    module a.b when that is one of `modules`, else a (b is a name inside a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the project modules it imports}."""
    return {name: {n for n in imported_names(path, name, modules) if n in modules and n != name}
            for name, path in modules.items()}


def layer(module: str) -> int:
    for prefix, level in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level
    raise KeyError(module)


def upward_imports(modules: dict[str, Path], graph: dict[str, set[str]]) -> list[str]:
    """One line per import of a module from a layer above the importer's (or of torch where it is banned)."""
    problems = []
    for name in sorted(graph):
        for target in sorted(graph[name]):
            if layer(target) > layer(name):
                problems.append(f"{name} ({LAYER_NAMES[layer(name)]}) imports {target} "
                                f"({LAYER_NAMES[layer(target)]}), a layer above it")
            elif name.startswith(CUBE_READERS) and target.startswith("replication") and layer(target) >= 2:
                problems.append(f"{name} imports {target}, a torch module of replication (analysis and report "
                                "read cubes only)")
        if name.startswith(TORCH_FREE):
            banned = {n.split(".")[0] for n in imported_names(modules[name], name, modules)} & set(TORCH_PACKAGES)
            problems += [f"{name} imports {package} (the cube readers and replication's base layer never import "
                         "torch)" for package in banned]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected component of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def project():
    modules = project_modules()
    return modules, import_graph(modules)


def test_every_module_has_a_layer(project):
    modules, _ = project
    for name in modules:
        layer(name)  # a KeyError names a module that LAYERS does not place


def test_no_module_imports_from_a_layer_above_it(project):
    modules, graph = project
    assert upward_imports(modules, graph) == []


def test_no_import_circle_among_the_project_modules(project):
    _, graph = project
    assert cycles(graph) == []


def test_nothing_below_the_pipeline_imports_an_experiment_or_post_training(project):
    _, graph = project
    importers = {name for name, targets in graph.items()
                 if any(layer(t) == 3 for t in targets) and layer(name) != 3}
    assert {name.split(".")[0] for name in importers} <= {"ptr", "bench"}


def write_tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    return project_modules(root)


def test_the_checks_catch_an_upward_import_a_torch_import_and_a_circle(tmp_path):
    modules = write_tree(tmp_path, {
        "data_prep/__init__.py": "",
        "data_prep/build.py": "def f():\n    from replication.config import X\n",  # lazy, still upward
        "replication/__init__.py": "",
        "replication/config.py": "from transformers import AutoConfig\n",
        "replication/models/__init__.py": "from replication.models import gguf\n",
        "replication/models/gguf.py": "from replication.mechanics.patching import p\n",
        "replication/mechanics/__init__.py": "",
        "replication/mechanics/patching.py": "from replication import models\n",
        "analysis/__init__.py": "",
        "analysis/figures.py": "import torch\nfrom replication.mechanics import patching\n",
    })
    graph = import_graph(modules)
    assert graph["replication.models"] == {"replication.models.gguf"}  # the submodule, not the package
    assert upward_imports(modules, graph) == [
        "analysis.figures imports replication.mechanics.patching, a torch module of replication (analysis and "
        "report read cubes only)",
        "analysis.figures imports torch (the cube readers and replication's base layer never import torch)",
        "data_prep.build (data_prep) imports replication.config (replication base (config, cubes, provenance, "
        "shapes)), a layer above it",
        "replication.config imports transformers (the cube readers and replication's base layer never import torch)",
    ]
    assert cycles(graph) == [["replication.mechanics.patching", "replication.models", "replication.models.gguf"]]
