"""The house rules of the source tree: one-way imports by phase, no lazy imports of our own code, small files."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Import order: a module may import its own layer and the layers before it, never one after it.
LAYERS = ["schemas", "pipeline.errors", "pipeline.store", "pipeline.data", "pipeline.nn", "pipeline.planning",
          "pipeline.feed", "pipeline.final", "workers", "pipeline.run", "pipeline.cli"]
# The places allowed to import inside a function: the CLI (so `--help` does not load torch and Ray), the
# package's public face (`from pipeline import load_encoder`, PEP 562), and the driver's handles on the work
# it runs in other processes (pipeline/run/offload.py: the module actor and the child-process steps import
# torch there, so the driver never does while the modules train).
LAZY_ALLOWED = {"pipeline/cli.py", "pipeline/__init__.py", "pipeline/run/offload.py"}
# Files that are tables of data rather than logic (the toy shapes) may pass the size limit.
DATA_TABLES = {"pipeline/data/toys.py"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for top in ("schemas", "pipeline", "workers") for p in (REPO / top).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name of ours; None for third-party names and the package root."""
    if module in ("pipeline.faults", "pipeline.malloc"):  # beside errors: the environment every layer may read
        module = "pipeline.errors"  # (fault injection: the store's writer; malloc settings: the feed's heap, the driver)
    if module == "pipeline.__main__":
        module = "pipeline.cli"
    best = None
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = i
    return best


def _imports(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node, a.name) for a in node.names]
    return found


def _resolve(name: str) -> int | None:
    # `from pipeline.final import plots` names pipeline.final.plots; `from pipeline.store import Store` names a
    # symbol of pipeline.store. Either way the longest prefix that is one of ours decides the layer.
    while name:
        layer = layer_of(name)
        if layer is not None:
            return layer
        name = name.rpartition(".")[0]
    return None


def test_imports_run_one_way_by_phase():
    wrong = []
    for path in _sources():
        rel = str(path.relative_to(REPO))
        if rel == "pipeline/__init__.py":
            continue
        own = layer_of(_module_name(path))
        assert own is not None, f"{rel} belongs to no layer: add its package to LAYERS in {__file__}"
        for node, name in _imports(ast.parse(path.read_text())):
            target = _resolve(name)
            if target is not None and target > own:
                wrong.append(f"{rel}:{node.lineno} imports {name} ({LAYERS[target]} comes after {LAYERS[own]})")
    assert not wrong, "imports against the phase order:\n" + "\n".join(wrong)


def test_no_lazy_imports_of_our_own_code():
    lazy = []
    for path in _sources():
        rel = str(path.relative_to(REPO))
        if rel in LAZY_ALLOWED:
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy += [f"{rel}:{node.lineno} imports {name} inside {fn.name}()"
                         for node, name in _imports(fn) if _resolve(name) is not None]
    assert not lazy, "imports inside functions (move them to the top of the file):\n" + "\n".join(sorted(set(lazy)))


def test_files_and_functions_stay_small():
    big = []
    for path in _sources():
        rel = str(path.relative_to(REPO))
        text = path.read_text()
        if rel not in DATA_TABLES and text.count("\n") > MAX_FILE_LINES:
            big.append(f"{rel}: {text.count(chr(10))} lines (limit {MAX_FILE_LINES}: split it by responsibility)")
        for fn in ast.walk(ast.parse(text)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = fn.end_lineno - fn.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    big.append(f"{rel}:{fn.lineno} {fn.name}() is {length} lines (limit {MAX_FUNCTION_LINES})")
    assert not big, "\n".join(big)


def test_layer_of_knows_the_order():
    assert layer_of("pipeline.store.reader") < layer_of("pipeline.nn.objectives.infonce") < layer_of("workers.trainer")
    assert _resolve("pipeline.final.plots") == LAYERS.index("pipeline.final")
    assert _resolve("torch.nn") is None
