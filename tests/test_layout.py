"""The house rules that the code's shape must keep (design.md): recipes are leaves, the loop names no backend."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lopt"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (lopt's own imports are all absolute)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


# What every layer above the recipes may read: the registry's records, and the TRL integration the recipes share.
SHARED_RECIPE_MODULES = ("lopt.recipes.registry", "lopt.recipes.trl")


def test_no_module_imports_a_recipe_but_the_cli_and_the_tools():
    importers = {
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if any(
            name.startswith("lopt.recipes.") and not name.startswith(SHARED_RECIPE_MODULES) for name in _imports(path)
        )
    }
    after_training = [p for folder in ("tools", "study") for p in (SRC / folder).rglob("*.py")]
    allowed = {"cli.py"} | {str(p.relative_to(SRC)) for p in after_training}
    assert importers, "the study imports the SFT recipe; finding none means this test reads the wrong tree"
    left = sorted(importers - allowed)
    assert importers <= allowed, f"only the CLI, the tools and the study may import a recipe: {left}"


def _identifiers(path: Path) -> set[str]:
    """The names code in `path` uses (variables, attributes, functions, arguments), docstrings and comments aside."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def test_the_sft_loop_names_no_parallel_backend():
    identifiers = {name.lower() for name in _identifiers(SRC / "recipes" / "sft.py")}
    imported = _imports(SRC / "recipes" / "sft.py")
    backends = {"lopt.parallel.fsdp", "lopt.parallel.deepspeed", "lopt.parallel.replicated"}
    assert not {name for name in imported if name.rsplit(".", 1)[0] in backends or name in backends}
    assert "lopt.parallel.launch.backend_from_environment" in imported  # the one place a backend is chosen
    assert "backend" in identifiers  # the loop talks to the interface
    for word in ("deepspeed", "fsdp", "zero", "shard", "engine", "scaler"):
        named = sorted(name for name in identifiers if word in name)
        assert not named, f"recipes/sft.py names {named}: backend knowledge belongs in parallel/"
