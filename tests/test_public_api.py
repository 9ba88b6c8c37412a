"""The engine's front door: the daemon imports only names `engine` declares in `__all__`,
every declared name resolves, and the daemon's modules do not import each other in a circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import engine

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, at any depth (function-level too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def engine_import_violations(root: Path) -> list[str]:
    """Imports under `root` that reach past engine's public names."""
    bad = []
    for path in sorted(root.rglob("*.py")):
        for line, module, names in _imports(path):
            where = f"{path.relative_to(root.parent)}:{line}"
            if module.startswith("engine."):
                bad.append(f"{where}: imports {module} (use `from engine import …`)")
            elif module == "engine":
                bad += [f"{where}: engine.{name} is not in engine.__all__" for name in names if name not in engine.__all__]
    return bad


def test_daemon_imports_only_public_engine_names():
    assert engine_import_violations(REPO / "daemon") == []


def test_the_check_catches_a_reach_into_a_subpackage(tmp_path):
    package = tmp_path / "daemon"
    package.mkdir()
    (package / "ok.py").write_text("from engine import Segmenter, ClassSet\n")
    (package / "deep.py").write_text("def f():\n    from engine.method.clustering import kl_kmeans\n")
    (package / "plain.py").write_text("import engine.segmenter\n")
    (package / "private.py").write_text("from engine import backends\n")
    found = engine_import_violations(package)
    assert len(found) == 3
    assert any("deep.py:2" in line for line in found)
    assert any("plain.py:1" in line for line in found)
    assert any("engine.backends is not in" in line for line in found)


def test_every_public_name_resolves():
    for name in engine.__all__:
        assert getattr(engine, name) is not None, name


def test_importing_the_engine_does_not_load_torch():
    # Capture and publisher processes import engine errors only; torch would cost them ~1 s and memory.
    code = "import sys, engine, daemon.capture, daemon.publisher; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _daemon_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "daemon").rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        targets = graph.setdefault(name, set())
        for _, module, names in _imports(path):
            if module.startswith("daemon"):
                targets.add(module)
                targets.update(f"{module}.{n}" for n in names)
    modules = set(graph)
    return {name: {t for t in targets if t in modules and t != name} for name, targets in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_daemon_modules_import_each_other_without_a_cycle():
    # Function-level imports count: they hide a cycle from Python, not from a reader.
    cycle = _cycle(_daemon_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
