"""The layout holds: no import cycle (function-level imports included), ``forcefield`` never imports ``md``, the
benchmarks never import the tests, and every package says what lives in it and who may import it."""
import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("forcefield", "forcefield.data", "forcefield.data.poly24", "forcefield.models", "forcefield.train",
            "forcefield.pretrain", "forcefield.fit", "md")


def _modules():
    mods = {}
    for pkg in ("forcefield", "md"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(mods):
    """module -> the oreo modules it imports anywhere in its body."""
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                found = subs + ([mod] if len(subs) < len(node.names) else [])
            else:
                continue
            for t in found:
                while t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != name:
                    targets.add(t)
        graph[name] = targets
    return graph


def test_no_import_cycle_and_forcefield_never_imports_md():
    graph = _imports(_modules())
    assert not [(m, t) for m, ts in graph.items() if m.startswith("forcefield") for t in ts if t.startswith("md")]
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_benchmarks_and_library_do_not_import_the_tests():
    for path in list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "forcefield").rglob("*.py")) \
            + list((ROOT / "md").rglob("*.py")) + list((ROOT / "release").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "tests" or n.startswith("tests.") for n in names), path


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_says_what_lives_there_and_who_imports_it(package):
    doc = importlib.import_module(package).__doc__ or ""
    assert len(doc.splitlines()) > 3 and "import" in doc.lower(), package
