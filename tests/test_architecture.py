"""The layering of the package, checked from its imports (every import, function-level ones too):

    cli                                   the command: imports anything, imported by nothing
    chat evaluate predict export demo cache serve/ studio/    the edges
    rundir train/                         the run directory; training (loop, fused pass, steps, checkpoints)
    decode/                               decoding: one loop, its backends, kernels, sampling
    data/ templates                       rows -> conversations -> token ids
    models/                               loading, tokenizers, LoRA, the architecture description
    config atomic errors                  foundations

Decoding never imports training (nor the training data); models and data never import decoding,
training or an edge; nothing imports the CLI; no module imports itself through others."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "chatlora"
EDGES = {"chat", "evaluate", "predict", "export", "demo", "cache", "serve", "studio"}
TODAY_FLOORS = 13   # the import graph's depth before the package was given its folders


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def imports_of(path: Path, known: set[str]) -> set[str]:
    """chatlora modules `path` imports, as dotted names below chatlora ("decode.loop")."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "chatlora":
            base = node.module.removeprefix("chatlora").lstrip(".")
            for alias in node.names:   # `from chatlora.decode import engine` names a module
                candidate = f"{base}.{alias.name}" if base else alias.name
                found.add(candidate if candidate in known else base)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("chatlora.") for a in node.names if a.name.startswith("chatlora.")}
    return {m for m in found if m and m in known} - {module_name(path)}


def graph() -> dict[str, set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"]
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known) for p in paths}


def layer(module: str) -> str:
    return module.split(".")[0]


def test_nothing_imports_the_cli():
    assert [m for m, deps in graph().items() if "cli" in deps] == []


def test_decoding_never_imports_training_or_the_training_data():
    for name, deps in graph().items():
        if layer(name) == "decode":
            assert not {d for d in deps if layer(d) in ("train", "rundir") or d == "data.dataset"}, (name, deps)


def test_models_and_data_import_nothing_above_them():
    above = {"decode", "train", "rundir", "cli"} | EDGES
    for name, deps in graph().items():
        if layer(name) in ("models", "data", "templates", "config", "atomic", "errors"):
            assert not {d for d in deps if layer(d) in above}, (name, deps)


def test_core_modules_import_no_edge():
    for name, deps in graph().items():
        if layer(name) not in EDGES | {"cli"}:
            assert not {d for d in deps if layer(d) in EDGES}, (name, deps)


def test_serving_and_chat_never_import_the_training_loop():
    for name, deps in graph().items():
        if layer(name) in ("serve", "chat"):
            assert not deps & {"train.loop", "train.fused", "train.steps", "data.dataset"}, (name, deps)


def test_no_circles_and_fewer_floors():
    g = graph()
    floors: dict[str, int] = {}

    def floor(module: str, path: tuple[str, ...] = ()) -> int:
        assert module not in path, f"an import circle: {' -> '.join(path + (module,))}"
        if module not in floors:
            floors[module] = 1 + max((floor(d, path + (module,)) for d in g[module]), default=0)
        return floors[module]

    assert max(floor(m) for m in g) < TODAY_FLOORS, floors


def test_module_size_budget():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 450, f"{path.name} has {lines} lines; split it (about 400 per module)"


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


def test_tests_and_benchmarks_import_no_test_module():
    """Shared test code lives in tests/helpers.py (and conftest.py's fixtures); benchmarks import the
    package only."""
    root = PACKAGE.parents[1]
    tests = {p.stem for p in (root / "tests").glob("test_*.py")} | {"conftest"}
    for folder in ("tests", "bench"):
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                assert not set(names) & tests, f"{path.name} imports {set(names) & tests}"


def test_every_name_tests_and_benchmarks_import_from_chatlora_exists():
    """GPU tests and benchmarks do not run here; a name they import that a move or a rename took
    away would only show on the GPU machine."""
    import importlib.util

    root = PACKAGE.parents[1]
    missing = []
    for folder in ("tests", "bench"):
        for path in (root / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "chatlora":
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if not hasattr(module, alias.name) and \
                                importlib.util.find_spec(f"{node.module}.{alias.name}") is None:
                            missing.append(f"{path.name}: {node.module}.{alias.name}")
    assert not missing, missing
