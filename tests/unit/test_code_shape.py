"""The house rules of include/airmlops, checked on the source itself.

- A module over 600 lines or a function over 80 lines carries a one-line reason: a comment
  ``# size: <reason>`` among the module's first 40 lines, or directly above the ``def`` (above
  its decorators).
- No import circles between airmlops modules, counting imports inside functions (a lazy import
  hides a circle, it does not remove it).
- Only :mod:`airmlops.settings` reads the environment.
- Only the DAG layer (``airmlops/dags/``) imports ``airflow.sdk`` at module level.
- The platform-name pattern is written once (:mod:`airmlops.names`).
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "include"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
REASON = "# size:"


def _module_name(path: Path) -> str:
    parts = path.with_suffix("").relative_to(PACKAGE_ROOT).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((PACKAGE_ROOT / "airmlops").rglob("*.py"))}


@functools.cache
def _tree(name: str) -> ast.Module:
    return ast.parse(_modules()[name].read_text(encoding="utf-8"))


def _lines(name: str) -> list[str]:
    return _modules()[name].read_text(encoding="utf-8").splitlines()


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _has_reason_above(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return first >= 2 and lines[first - 2].strip().startswith(REASON)


def test_modules_over_600_lines_say_why():
    unexplained = []
    for name in _modules():
        lines = _lines(name)
        if len(lines) > MAX_MODULE_LINES and not any(
                line.strip().startswith(REASON) for line in lines[:40]):
            unexplained.append(f"{name} ({len(lines)} lines)")
    assert not unexplained, f"modules over {MAX_MODULE_LINES} lines without a reason: " \
                            f"{unexplained}"


def test_functions_over_80_lines_say_why():
    unexplained = []
    for name in _modules():
        lines = _lines(name)
        for node in _functions(_tree(name)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not _has_reason_above(lines, node):
                unexplained.append(f"{name}.{node.name} ({length} lines)")
    assert not unexplained, f"functions over {MAX_FUNCTION_LINES} lines without a reason: " \
                            f"{unexplained}"


def _imported(name: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The airmlops modules ``node`` (in module ``name``) imports."""
    modules = _modules()
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                   for alias in node.names]
    return {t for t in targets if t in modules and t != name}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str) -> set[str]:
    """Every airmlops module ``name`` imports, at module level or inside functions, but not
    under ``if TYPE_CHECKING:``."""
    found: set[str] = set()
    skipped = {id(n) for n in ast.walk(_tree(name))
               if isinstance(n, ast.If) and _is_type_checking(n)
               for n in ast.walk(n) if n is not None}
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
            found |= _imported(name, node)
    return found


def _cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph = {name: _imports(name) for name in _modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return found


def test_no_import_circles():
    assert _cycles() == []


def _is_environment_read(node: ast.AST) -> bool:
    """``os.environ`` / ``os.getenv`` used, or imported from ``os``."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("environ", "getenv", "environb") \
            and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.ImportFrom) and node.module == "os" and any(
        alias.name in ("environ", "getenv") for alias in node.names)


def _reads_environment(tree: ast.Module) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if _is_environment_read(node)]


def test_only_the_settings_module_reads_the_environment():
    readers = {name: lines for name in _modules() if name != "airmlops.settings"
               for lines in [_reads_environment(_tree(name))] if lines}
    assert readers == {}


def _module_level_imports(tree: ast.Module) -> Iterator[str]:
    for node in tree.body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
        elif isinstance(node, ast.If | ast.Try) and not (
                isinstance(node, ast.If) and _is_type_checking(node)):
            yield from _module_level_imports(ast.Module(body=node.body, type_ignores=[]))


def test_only_the_dag_layer_imports_airflow_sdk_at_module_level():
    importers = sorted(name for name in _modules()
                       if not name.startswith("airmlops.dags")
                       and any(m == "airflow.sdk" or m.startswith("airflow.sdk.")
                               for m in _module_level_imports(_tree(name))))
    assert importers == []


@pytest.mark.parametrize("pattern", [r"[a-z][a-z0-9_]{0,62}"])
def test_the_name_pattern_is_written_once(pattern: str):
    writers = sorted(name for name in _modules() if pattern in _modules()[name].read_text())
    assert writers == ["airmlops.names"]


def test_the_rules_catch_what_they_name(tmp_path: Path):
    """The checks above can fail: each finds its fault in a small sample."""
    sample = ast.parse("import os\nfrom airflow.sdk import dag\n"
                       "def f():\n" + "    x = 1\n" * 90 + "    return os.environ\n")
    assert _reads_environment(sample) == [94]
    assert list(_module_level_imports(sample)) == ["os", "airflow.sdk"]
    function = next(_functions(sample))
    assert function.end_lineno - function.lineno + 1 > MAX_FUNCTION_LINES
    assert not _has_reason_above(ast.unparse(sample).splitlines(), function)
    assert _has_reason_above(["# size: one loop", "def f():"],
                             ast.parse("\ndef f():\n    pass\n").body[0])
