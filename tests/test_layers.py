"""The package's layers import one way: what each layer may not import, read from the source (ast)."""

import ast

import pytest
from helpers.data import REPO

PACKAGE = REPO / "metalearn"
# The components compute (an algorithm reads no files); the storage, export and configuration layers and the
# report know no component; nothing below the front end imports it.
FRONT_END = ("metalearn.cli", "metalearn.commands")
RUNNER = ("metalearn.train", "metalearn.evaluate", "metalearn.hooks", "metalearn.report")
COMPONENTS = ("metalearn.algorithms", "metalearn.models", "metalearn.data", "metalearn.loggers")
FILES = ("metalearn.storage", "metalearn.export")
RUN_FILES = (
    "metalearn.storage.checkpoint",
    "metalearn.storage.run_folder",
    "metalearn.storage.run_lock",
    "metalearn.export",
)
MAY_NOT_IMPORT = {
    # the algorithms themselves; their builder (the package's __init__) loads what a setting names (a teacher run)
    "metalearn.algorithms.*": (*FRONT_END, *RUNNER, *FILES),
    "metalearn.algorithms": (*FRONT_END, *RUNNER, *RUN_FILES[1:]),
    "metalearn.models": (*FRONT_END, *RUNNER, *FILES, "metalearn.algorithms"),
    # a dataset's cache and a logger write their own files, atomically (storage.atomic), never a run's
    "metalearn.data": (*FRONT_END, *RUNNER, *RUN_FILES, "metalearn.algorithms", "metalearn.models"),
    "metalearn.loggers": (*FRONT_END, *RUNNER, *RUN_FILES, "metalearn.algorithms", "metalearn.models"),
    "metalearn.storage": (*FRONT_END, *RUNNER, *COMPONENTS),
    "metalearn.export": (*FRONT_END, *RUNNER, *COMPONENTS),
    "metalearn.config": (*FRONT_END, *RUNNER, "metalearn.algorithms", "metalearn.models", "metalearn.data"),
    "metalearn.confidence": ("metalearn",),
    "metalearn.report": (*FRONT_END, "metalearn.train", "metalearn.evaluate", "metalearn.hooks", *COMPONENTS),
    "metalearn.train": FRONT_END,
    "metalearn.evaluate": FRONT_END,
    "metalearn.hooks": FRONT_END,
}


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, top_level_only: bool = False) -> set[str]:
    """The metalearn modules a file imports (at its top level only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("metalearn")}


def within(name: str, prefix: str) -> bool:
    """`name` is `prefix` or below it; "<package>.*" means below the package only."""
    if prefix.endswith(".*"):
        return name.startswith(prefix[:-1])
    return name == prefix or name.startswith(prefix + ".")


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("layer", sorted(MAY_NOT_IMPORT))
def test_a_layer_imports_nothing_above_it(layer):
    wrong = [
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        if within(name, layer)
        for imported in sorted(imports(path))
        for banned in MAY_NOT_IMPORT[layer]
        if within(imported, banned) and not within(imported, layer)
    ]
    assert not wrong, wrong


def test_no_module_imports_another_that_imports_it_back():
    graph = {name: {m for m in imports(path, top_level_only=True) if m in MODULES} for name, path in MODULES.items()}
    state = {}

    def visit(name, trail):
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", f"an import cycle: {' -> '.join(trail + [name])}"
        state[name] = "open"
        for other in sorted(graph[name]):
            visit(other, trail + [name])
        state[name] = "done"

    for name in sorted(graph):
        visit(name, [])


def test_no_module_is_named_after_a_standard_library_module():
    import sys

    clashes = [name for name in MODULES if name.rsplit(".", 1)[-1] in sys.stdlib_module_names]
    assert not clashes, clashes
