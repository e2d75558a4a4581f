"""Layout: what kind of artifact a path is has one home (ondevice.inspectors.kinds), and the import graph of
ondevice/ has no cycle through it; every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ondevice"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every `import ondevice...` / `from ondevice... import` anywhere in a module (lazy ones included: a cycle
    through a function-level import is still two modules deciding one thing between them)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    stack = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, trail = stack.pop()
        for nxt in graph[node]:
            if nxt == start:
                return trail + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, trail + [nxt]))
    return None


def test_artifact_kind_has_one_home_and_no_cycle():
    graph = _import_graph()
    for module in ("ondevice.inspectors.kinds", "ondevice.inspectors", "ondevice.inspectors.source",
                   "ondevice.bench.artifacts"):
        assert _cycle_through(graph, module) is None, " -> ".join(_cycle_through(graph, module))
    assert not any(m.startswith("ondevice.bench") for m in graph["ondevice.inspectors.kinds"])
    for inspector in [m for m in graph if m.startswith("ondevice.inspectors")]:
        assert not any(m.startswith("ondevice.bench") for m in graph[inspector]), inspector


def test_each_module_imports_alone():
    for module in ("ondevice.inspectors.kinds", "ondevice.inspectors", "ondevice.inspectors.source",
                   "ondevice.bench.artifacts", "ondevice.bench.backends.base"):
        result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_the_kind_is_the_same_everywhere():
    from ondevice.bench import artifacts
    from ondevice.bench.backends import base
    from ondevice.inspectors import kinds

    assert artifacts.artifact_kind is kinds.artifact_kind and base.ARTIFACT_KINDS is kinds.ARTIFACT_KINDS


def test_no_backend_tests_an_architecture_name():
    """The decoder's backends (runtime, graph builders, numpy reference) read the spec's features, never the
    architecture's name: a comparison of anything named `arch` with a string is a backdoor around the description."""
    from ondevice.architectures import ARCHITECTURES

    names = set(ARCHITECTURES)
    files = [*sorted((PACKAGE / "runtime").glob("*.py")), *sorted((ROOT / "converters").glob("*.py")),
             PACKAGE / "decoder.py", PACKAGE / "reference.py", PACKAGE / "rope.py"]
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named_arch = any("arch" in ast.unparse(side) for side in sides)
            strings = {c.value for side in sides for c in ast.walk(side) if isinstance(c, ast.Constant)}
            if named_arch and strings & names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not offenders, offenders
