"""The layer order of lopt's packages (docs/architecture.md), enforced: an import goes only downward or within its
layer, and no two modules import each other, directly or around a cycle. Every import counts, function-local ones
too (they run as surely, only later); only imports under `if TYPE_CHECKING:` are left out (they never run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"

# Bottom to top. A module's layer is that of the longest prefix of its name listed here.
LAYERS: list[tuple[str, ...]] = [
    # the foundation: errors, terminal policy, answer parsing, the run folder as data
    ("lopt", "lopt.errors", "lopt.output", "lopt.answers", "lopt.keep_previous", "lopt.runs"),
    # the domain: the block wrapper, adapters and model registry; data sources, formats, collation; tasks; rewards
    ("lopt.models", "lopt.data", "lopt.tasks", "lopt.rewards"),
    # every flag: schema, parsing, validation (its choices come from the domain's registries)
    ("lopt.config",),
    # the loop's parts and the backends
    ("lopt.training", "lopt.parallel"),
    # the recipes and their registry: leaves
    ("lopt.recipes",),
    # after training and watching: they read run folders and the registry
    ("lopt.evaluation", "lopt.tools", "lopt.dashboard", "lopt.study"),
    # the command
    ("lopt.cli",),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or module.startswith(prefix + ".")]  # fmt: skip
    assert matches, f"{module} is in no layer: add its package to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The lopt modules `path` imports (a `from package import name` of a submodule counts as that submodule)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, up level - 1 packages
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        if _type_checking_only(node, parents):
            continue
        found.update(name for name in names if name == "lopt" or name.startswith("lopt."))
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in SOURCE.joinpath("lopt").rglob("*.py")}
    modules = set(paths)
    # importing a module runs its packages' __init__ first: those edges say nothing about layers
    return {
        name: {imported for imported in imports_of(path, modules) if not name.startswith(imported + ".")}
        for name, path in paths.items()
    }


def test_every_import_goes_down_the_layers_or_stays_in_its_layer():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {imported} (layer {layer_of(imported)})"
        for module, imported_modules in sorted(import_graph().items())
        for imported in sorted(imported_modules)
        if layer_of(imported) > layer_of(module)
    ]
    assert upward == []


def test_no_module_of_the_runtime_imports_a_tool_or_the_dashboard():
    runtime = ("lopt.training", "lopt.recipes", "lopt.models", "lopt.data", "lopt.parallel", "lopt.config")
    offending = [
        f"{module} imports {imported}"
        for module, imported_modules in sorted(import_graph().items())
        if module.startswith(runtime)
        for imported in sorted(imported_modules)
        if imported.startswith(("lopt.tools", "lopt.dashboard"))
    ]
    assert offending == []


def test_there_is_no_import_cycle():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.parametrize(
    ("module", "layer"), [("lopt.runs", 0), ("lopt.models.local_learning", 1), ("lopt.recipes.registry", 4)]
)
def test_layer_of_takes_the_longest_listed_prefix(module, layer):
    assert layer_of(module) == layer
