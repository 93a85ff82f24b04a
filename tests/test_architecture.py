"""The dependency direction of design.md, checked from the imports."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "chatlora"
EDGES = {"chat", "serve", "evaluate", "export", "cli"}


def imports_of(module: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("chatlora"):
            names.add(node.module.split(".")[1] if "." in node.module else node.names[0].name)
            if node.module == "chatlora":
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("chatlora."))
    return names


def modules() -> dict[str, set[str]]:
    return {p.stem: imports_of(p) for p in PACKAGE.glob("*.py") if p.stem != "__main__"}


def test_nothing_imports_the_cli():
    assert [m for m, deps in modules().items() if "cli" in deps] == []


def test_core_modules_import_no_edge():
    for name, deps in modules().items():
        if name not in EDGES:
            assert not deps & EDGES, f"{name} imports an edge module: {deps & EDGES}"


def test_generate_chat_serve_never_import_train():
    for name in ("generate", "chat", "serve"):
        assert "train" not in modules().get(name, set())


def test_module_size_budget():
    for path in PACKAGE.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path.name} has {lines} lines; split it (design.md: ~400 per module)"


def test_pyflakes_finds_nothing():
    """Undefined names, unused imports and the like: a NameError on an error path is a real bug."""
    import io

    from pyflakes.api import checkPath
    from pyflakes.reporter import Reporter

    out = io.StringIO()
    root = PACKAGE.parents[1]
    count = sum(checkPath(str(p), Reporter(out, out)) for folder in ("src", "tests", "bench")
                for p in (root / folder).rglob("*.py"))
    assert count == 0, out.getvalue()
