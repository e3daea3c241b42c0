"""Hosts import the core only through ``flexlora_plugin.core`` and only names in its ``__all__``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flexlora_plugin.core as core

ROOT = Path(__file__).resolve().parents[1]
HOSTS = [ROOT / "flexlora_plugin" / "flower", ROOT / "flexlora_plugin" / "federatedscope", ROOT / "flower_app"]


def _core_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import of the core in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base if node.level else "", node.module or "") if p)
            if module.startswith("flexlora_plugin.core"):
                out.append((node.lineno, module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("flexlora_plugin.core")]
    return out


FILES = sorted(p for host in HOSTS for p in host.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hosts_import_only_public_core_names(path):
    for line, module, names in _core_imports(path):
        assert module == "flexlora_plugin.core", f"{path.name}:{line} imports {module}"
        hidden = [n for n in names if n not in core.__all__]
        assert not hidden, f"{path.name}:{line} imports {hidden}, not in flexlora_plugin.core.__all__"


def test_the_scan_sees_relative_and_absolute_imports(tmp_path):
    pkg = ROOT / "flexlora_plugin" / "flower"
    assert any(_core_imports(p) for p in pkg.rglob("*.py"))  # the strategy imports the core relatively
    assert all(m == "flexlora_plugin.core" for p in pkg.rglob("*.py") for _, m, _ in _core_imports(p))


PACKAGE = ROOT / "flexlora_plugin"
TOOLS = PACKAGE / "tools"
ENTRY_SHIMS = {PACKAGE / "flower" / "run.py", PACKAGE / "evaluate.py"}  # `python -m` names kept for the tools


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative imports resolved."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            out.append((node.lineno, ".".join(p for p in (base, node.module or "") if p)))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if TOOLS not in p.parents and p not in ENTRY_SHIMS)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_neither_imports_the_tools_nor_reads_the_repository_layout(path):
    """An installed wheel has no repository around it: no ``parents[...]``, and the tools stay outside the library."""
    tools = [(line, m) for line, m in _imports(path) if m.startswith("flexlora_plugin.tools")]
    assert not tools, f"{path.name} imports the tools: {tools}"
    assert ".parents[" not in path.read_text(encoding="utf-8"), f"{path.name} finds files by the repository's layout"


def test_the_layout_scan_sees_the_tools_and_the_shims():
    assert any(m.startswith("flexlora_plugin.tools") for p in ENTRY_SHIMS for _, m in _imports(p))
    assert (TOOLS / "flower_run.py").is_file() and len(LIBRARY) > 30
