"""The package's layout: every module imports, no import cycles, torch model code without OpenMM.

The import graph is read from the source (every ``import`` statement, also those inside functions),
so a cycle is found whatever the entry point; importing each module checks that the graph is real.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "openmm_backmap"
# torch model code: no OpenMM (and nothing of the package that imports it)
TORCH_SIDE = (
    "openmm_backmap.geometry",
    "openmm_backmap.mapping",
    "openmm_backmap.units",
    "openmm_backmap.flows",
    "openmm_backmap.models",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "_plugin" not in p.parts}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level packages) that the file imports anywhere."""
    inner, outer = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from package import module` imports the module
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == "openmm_backmap" or name.startswith("openmm_backmap."):
                while name not in MODULES:
                    name = name.rsplit(".", 1)[0]
                inner.add(name)
            else:
                outer.add(name.split(".")[0])
    return inner, outer


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _unit(module: str) -> str:
    """The subpackage (or top-level module) a module belongs to: openmm_backmap.io.pdb -> io."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read():
    assert "openmm_backmap.openmm.compiled" in GRAPH["openmm_backmap.openmm.forces"][0]
    assert "openmm" in GRAPH["openmm_backmap.openmm.forces"][1]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_modules():
    edges = {m: {i for i in inner if i != m} for m, (inner, _) in GRAPH.items()}
    assert _find_cycle(edges) is None


def test_no_import_cycle_between_subpackages():
    edges: dict[str, set[str]] = {}
    for module, (inner, _) in GRAPH.items():
        edges.setdefault(_unit(module), set()).update(_unit(i) for i in inner if _unit(i) != _unit(module))
    assert _find_cycle(edges) is None, edges


def test_torch_model_code_does_not_import_openmm():
    side = [m for m in MODULES if m.startswith(TORCH_SIDE)]
    assert "openmm_backmap.models.cg_potential" in side and "openmm_backmap.flows.internal" in side
    seen, todo = set(), list(side)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        inner, outer = GRAPH[module]
        assert not outer & {"openmm", "simtk", "openmmtools", "openmmtorch"}, (module, outer)
        todo.extend(inner)
    assert all(m.startswith(TORCH_SIDE) or m == "openmm_backmap" for m in seen), sorted(seen)


def test_the_demos_call_the_library_not_the_cli():
    for demo in ("openmm_backmap.demo", "openmm_backmap.demo_data_free"):
        assert "openmm_backmap.cli" not in GRAPH[demo][0]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def _imported_names() -> list[tuple[str, str, str]]:
    """(file:line, module, name) of every `from openmm_backmap... import name`, inside functions too."""
    out = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith(PACKAGE.name):
                continue
            if node.module != "openmm_backmap._plugin":  # the build output of cpp/, absent from a source tree
                out += [(f"{module}:{node.lineno}", node.module, alias.name) for alias in node.names]
    return out


def test_every_module_imports_and_every_imported_name_exists():
    # a lazy import of a name that moved away fails only when its function runs: check them all here
    code = (
        "import importlib\n"
        f"for name in {sorted(MODULES)!r}:\n    importlib.import_module(name)\n"
        "missing = []\n"
        f"for where, module, name in {_imported_names()!r}:\n"
        "    if not hasattr(importlib.import_module(module), name):\n"
        "        try:\n            importlib.import_module(module + '.' + name)\n"
        "        except ImportError:\n            missing.append((where, module, name))\n"
        "assert not missing, missing\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize(
    "module",
    [
        "openmm_backmap.geometry",
        "openmm_backmap.flows.internal",
        "openmm_backmap.models.backmapper",
        "openmm_backmap.models.cg_potential",
    ],
)
def test_torch_model_code_runs_without_openmm(module):
    # mapping.py is checked above only: it needs mdtraj, and mdtraj loads OpenMM's unit module
    code = (
        f"import sys, {module}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('openmm', 'simtk', 'mdtraj')]\n"
        "print(bad)\nsys.exit(1 if bad else 0)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_public_names_resolve():
    result = _run(
        "import openmm_backmap as ob\n"
        "for name in ob.__all__:\n    getattr(ob, name)\n"
        "from openmm_backmap import CGMapping, BackmapReporter, load_model, create_force, "
        "create_cg_system, ResolutionMove, reweight, __version__\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
