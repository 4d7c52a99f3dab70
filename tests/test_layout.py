"""The layout rules the code keeps (README "Layout"), checked on the source:

- the core never imports the method registry: only the entry points (api, cli, demo) look a method up;
- a method pass imports only fxprune.method and its own package;
- op knowledge lives in the op table (ops.py and the rule / shape functions it names: rules.py, shapes.py, with
  cmap.op_name that names ops) and module knowledge in the module table (modules.py): no ATen op name and no
  test of a module's type anywhere else (the model zoo's weight init aside)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "fxprune"
ENTRY_POINTS = {"api.py", "cli.py", "demo.py"}
OP_AND_MODULE_TABLES = {"ops.py", "rules.py", "shapes.py", "cmap.py", "modules.py", "zoo.py"}
MODULE_TYPES = re.compile(r"^(nn|torch\.nn)\.(modules\.|Conv|ConvTranspose|Linear|BatchNorm|LayerNorm|GroupNorm|"
                          r"InstanceNorm|Embedding|MultiheadAttention|_ConvNd|_NormBase|Conv1D)")


def _files(under: Path):
    return sorted(p for p in under.rglob("*.py"))


def _imports(tree) -> list[tuple[str, int]]:
    """(module, level) of every import; ``from . import x`` inside fxprune/passes is ('', 1)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
            if node.module in ("fxprune", None) or (node.level == 1 and not node.module):
                out += [(f"{node.module or ''}.{a.name}".lstrip("."), node.level) for a in node.names]
    return out


def test_only_the_entry_points_import_the_method_registry():
    bad = []
    for p in _files(ROOT):
        if p.parent.name == "passes" or p.name in ENTRY_POINTS:
            continue
        for mod, level in _imports(ast.parse(p.read_text())):
            if mod.startswith("fxprune.passes") or mod == "fxprune.passes" or (level == 1 and mod.startswith("passes")):
                bad.append(f"{p.name} imports {mod}")
    assert not bad, bad


def test_method_passes_import_only_fxprune_method():
    bad = []
    for p in _files(ROOT / "passes"):
        for mod, level in _imports(ast.parse(p.read_text())):
            if level == 0 and mod.startswith("fxprune") and mod not in ("fxprune.method", "fxprune.passes"):
                bad.append(f"{p.name} imports {mod}")
            if level >= 2:
                bad.append(f"{p.name} imports ..{mod} (the core, around fxprune.method)")
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "fxprune.method":
                bad += [f"{p.name} imports private {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, bad


def _docstrings(tree) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _leaks(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docs, out = _docstrings(tree), []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and re.search(r"\baten\.[a-z_]", node.value):
            out.append(f"{where}: op name {node.value!r}")
        elif isinstance(node, ast.Attribute) and _dotted(node).startswith("torch.ops.aten"):
            out.append(f"{where}: {_dotted(node)}")
        elif isinstance(node, ast.Call) and _dotted(node.func) in ("isinstance", "issubclass") and len(node.args) == 2:
            kinds = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
            out += [f"{where}: tests for {_dotted(k)}" for k in kinds if MODULE_TYPES.match(_dotted(k))]
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute) and node.left.attr == "__name__":
            out.append(f"{where}: tests a type by name")
    return out


def test_no_op_name_or_module_type_test_outside_the_tables():
    leaks = [x for p in _files(ROOT) if p.name not in OP_AND_MODULE_TABLES for x in _leaks(p)]
    assert not leaks, "op or module knowledge outside ops.py / modules.py:\n" + "\n".join(leaks)


@pytest.mark.parametrize("snippet", ["isinstance(m, nn.Conv2d)", "x = 'aten.relu'",
                                     "f = torch.ops.aten.convolution.default", "type(m).__name__ == 'Conv1D'"])
def test_the_check_catches_each_kind_of_leak(tmp_path, snippet):
    p = tmp_path / "probe.py"
    p.write_text(snippet + "\n")
    assert _leaks(p)
