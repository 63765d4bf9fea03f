"""Plugins know nothing of each other: they meet in the layer spec and in `plugins.common`,
which is no plugin and imports none. Read from the sources' import statements (those
inside functions included), so that a lazy import cannot hide a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers import paths

ROOT = paths.REPO
PLUGINS = ROOT / "plugins"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PLUGINS.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The modules `name` imports: `from a.b import c` is a.b, and a.b.c if that is one."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if f"{node.module}.{a.name}" in MODULES)
    return found


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def package_modules(package: str) -> list[str]:
    return sorted(m for m in MODULES if within(m, package))


@pytest.mark.parametrize("name", package_modules("plugins.common"))
def test_common_imports_no_plugin(name):
    assert not [m for m in imports(name) if within(m, "plugins") and not within(m, "plugins.common")
                or within(m, "integration")]


@pytest.mark.parametrize("name", package_modules("plugins.mla") + package_modules("plugins.moe"))
def test_only_fp8_knows_fp8(name):
    assert not [m for m in imports(name) if within(m, "plugins.fp8")]


@pytest.mark.parametrize("name", package_modules("plugins.fp8"))
def test_fp8_knows_no_other_plugin(name):
    assert not [m for m in imports(name) if within(m, "plugins.mla") or within(m, "plugins.moe")]


def test_no_import_cycles():
    """No module of plugins/ reaches itself through imports (quantize and triton_quantize
    once imported each other's private checks). The registry (`plugins` itself) is left
    out: it lists the plugins, which import its `Plugin` record."""
    graph = {name: {m for m in imports(name) if m in MODULES and m not in (name, "plugins")}
             for name in MODULES if name != "plugins"}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            assert name != start, f"{start} imports itself through {sorted(seen)}"
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
