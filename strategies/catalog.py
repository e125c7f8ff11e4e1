"""The strategies and wrappers a run can name, with one-line summaries, known without importing them.

Importing a strategy module imports torch and transformers (seconds), while `fedsim strategies` and
`fedsim run --help` must answer at once. So this module reads source and never runs it: the
registry's tables (`BUILTIN_MODULES`, `WRAPPER_MODULES`, `ENTRY_POINT_GROUP`: literals in
`strategies/registry.py`, which stays the only list), each strategy's
`StrategyDefinition(name=..., summary=...)`, and for a wrapper the first paragraph of its module
docstring. Plug-ins are found through their entry points, which name their module. A summary that
is not a literal in the source falls back to the module docstring. Strategies registered at run
time by calling `register` are not seen. tests/test_cli.py checks the catalog against the imported
registry.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

REGISTRY_MODULE = "fedtune.strategies.registry"


@dataclass(frozen=True)
class CatalogEntry:
    """A strategy (by the name `strategy = ...` takes) or a wrapper (by its config section)."""

    name: str
    module: str
    summary: str


def strategies() -> list[CatalogEntry]:
    """Every strategy a config can select, built-in first in precedence, as `registry.get_strategy` resolves."""
    tables = _registry_tables()
    found = {name: CatalogEntry(name, module, _definition_summary(module, name))
             for name, module in tables["BUILTIN_MODULES"].items()}
    for entry in entry_points(group=tables["ENTRY_POINT_GROUP"]):
        if entry.name not in found:
            found[entry.name] = CatalogEntry(entry.name, entry.module, _definition_summary(entry.module, entry.name))
    return sorted(found.values(), key=lambda entry: entry.name)


def wrappers() -> list[CatalogEntry]:
    """Every wrapper, by the config section that applies it, in the order they wrap (innermost first)."""
    return [CatalogEntry(section, module, docstring_summary(_source_tree(module)))
            for section, module in _registry_tables()["WRAPPER_MODULES"].items()]


def listing() -> str:
    """The text `fedsim strategies` prints and `fedsim run --help` ends with."""
    named = strategies()
    sections = [(f"[{entry.name}]", entry.summary) for entry in wrappers()]
    width = max(len(name) for name in [*(entry.name for entry in named), *(name for name, _ in sections)])
    return "\n".join([
        'strategies (strategy = "NAME"):',
        *(f"  {entry.name:<{width}}  {entry.summary}" for entry in named),
        "wrappers (a [SECTION] table in the config applies one, around the strategy):",
        *(f"  {name:<{width}}  {summary}" for name, summary in sections),
    ])


def docstring_summary(tree: ast.Module | None) -> str:
    """The first paragraph of a module's docstring, on one line."""
    docstring = ast.get_docstring(tree) if tree is not None else None
    return " ".join((docstring or "").split("\n\n")[0].split())


def _registry_tables() -> dict[str, Any]:
    tree = _source_tree(REGISTRY_MODULE)
    assert tree is not None, f"{REGISTRY_MODULE} has no Python source"
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("BUILTIN_MODULES", "WRAPPER_MODULES", "ENTRY_POINT_GROUP"):
                tables[name] = ast.literal_eval(node.value)
    return tables


def _source_tree(module: str) -> ast.Module | None:
    """The module's parsed source (its parent packages are imported, the module itself is not)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    with open(spec.origin, encoding="utf-8") as source:
        return ast.parse(source.read(), spec.origin)


def _definition_summary(module: str, name: str) -> str:
    """The literal `summary` of the module's `StrategyDefinition(name=<name>, ...)`, else its docstring's."""
    tree = _source_tree(module)
    for node in ast.walk(tree) if tree is not None else ():
        if isinstance(node, ast.Call) and _called(node.func) == "StrategyDefinition":
            keywords = {keyword.arg: keyword.value for keyword in node.keywords}
            given_name, summary = keywords.get("name"), keywords.get("summary")
            if (isinstance(given_name, ast.Constant) and given_name.value == name
                    and isinstance(summary, ast.Constant) and isinstance(summary.value, str)):
                return summary.value
    return docstring_summary(tree)


def _called(function: ast.expr) -> str:
    return function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
