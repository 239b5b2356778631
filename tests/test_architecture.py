"""The layout rules of the house, checked on the source: no import cycle inside ``tao_core`` (every
import statement counts, function-level ones included), the core imports no plugin, the kernels
import nothing of tao, and modules and functions stay small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"tao_core": REPO / "tao_core", "tao_kernels": REPO / "kernels", "tao_plugins": REPO / "plugins"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
# (file, function) pairs allowed to be longer, each with the reason it should stay one piece.
LONG_FUNCTIONS: dict[tuple[str, str], str] = {}


def _modules(package: str) -> dict[str, Path]:
    root = PACKAGES[package]
    out = {}
    for path in root.rglob("*.py"):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module``'s import statements run, wherever they stand.

    ``from pkg import name`` names ``pkg.name`` when that is a module, else ``pkg``. Importing
    ``a.b.c`` also runs the packages ``a`` and ``a.b`` first (their ``__init__``), so those count
    too, except the packages ``module`` itself lives in (they are initialized before it, so an import
    of a sibling through them closes no cycle).
    """
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        own = {module.rsplit(".", k)[0] for k in range(1, module.count(".") + 1)} | ({module} if is_pkg else set())
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            while t:
                if t != module and t not in own:
                    out.add(t)
                t = t.rpartition(".")[0]
    return out


def _graph(package: str) -> dict[str, set[str]]:
    mods = _modules(package)
    known = set(mods) | {m for p in PACKAGES for m in _modules(p)}
    return {m: _imported(m, p, known) for m, p in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's own modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m] & graph.keys()):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle_in_the_core():
    cycle = _cycle(_graph("tao_core"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_an_import_runs_its_packages_too(tmp_path):
    """``from tao_core.engine.weights import X`` in models.py would run engine/__init__.py, which
    imports the engine's modules: the graph must show that edge (a cycle otherwise hidden)."""
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from tao_core.engine.weights import POLICY\n")
    known = {"tao_core", "tao_core.engine", "tao_core.engine.weights", "tao_core.models"}
    assert _imported("tao_core.models", mod, known) == {"tao_core.engine", "tao_core.engine.weights"}
    sibling = tmp_path / "s.py"
    sibling.write_text("from tao_core.engine import weights\n")
    assert _imported("tao_core.engine.core", sibling, known) == {"tao_core.engine.weights"}


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_no_plugin_and_the_kernels_nothing_of_tao():
    for m, deps in _graph("tao_core").items():
        assert not {d for d in deps if d.startswith("tao_plugins")}, f"{m} imports a plugin: {deps}"
    for m, deps in _graph("tao_kernels").items():
        assert not {d for d in deps if d.startswith(("tao_core", "tao_plugins"))}, f"{m} imports {deps}"


def test_modules_and_functions_stay_small():
    too_long = []
    for package in ("tao_core", "tao_plugins"):
        for _, path in sorted(_modules(package).items()):
            rel = str(path.relative_to(REPO))
            lines = path.read_text().count("\n")
            if lines > MAX_MODULE_LINES:
                too_long.append(f"{rel}: {lines} lines (at most {MAX_MODULE_LINES})")
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                        too_long.append(f"{rel}:{node.lineno} {node.name}: {n} lines (at most {MAX_FUNCTION_LINES})")
    assert not too_long, "\n".join(too_long)
