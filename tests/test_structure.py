"""The package's structure, read from its own source: no import circles, and no import from a
lower layer to a higher one (issue 25). The layer order is declared here, and only here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sglp_llm"
# lowest first; a module may import from its own layer and the layers before it
LAYERS = [
    ("config", "data", "explain", "stability", "plan"),  # settings, calibration text, the plan and its words
    ("model",),
    ("passes",),
    ("statistics",),
    ("recovery",),
    ("selection",),
    ("output",),
    ("evaluation",),
    ("api", "heal", "compare", "time_plan"),  # the entry points (and the time plan of one)
    ("cli",),
    ("",),  # the package itself (sglp_llm/__init__.py: the public API)
]


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, package: Path) -> bool:
    path = package.joinpath(*name.split(".")) if name else package
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (annotations only, never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports ("" is the package itself), lazy imports included."""
    graph: dict[str, set[str]] = {}
    for path in sorted(package.rglob("*.py")):
        name = _module_name(path, package)
        here = name.split(".") if name else []
        if path.name != "__init__.py":
            here = here[:-1]
        targets: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "sglp_llm":
                    module = node.module.partition(".")[2]
                else:
                    continue
                for alias in node.names:  # `from . import x` imports the module x
                    sub = f"{module}.{alias.name}".lstrip(".")
                    targets.add(sub if _is_module(sub, package) else module)
            elif isinstance(node, ast.Import):
                targets |= {a.name.partition(".")[2] for a in node.names if a.name.split(".")[0] == "sglp_llm"}
        graph[name] = targets - {name}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"sglp_llm.{module} is in no layer: add its package or module to LAYERS in {__file__}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m or 'sglp_llm'} -> {t or 'sglp_llm'}" for m, targets in graph.items() for t in targets
                  if layer_of(t) > layer_of(m))


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_every_module_belongs_to_a_declared_layer():
    for module in import_graph():
        layer_of(module)


def test_the_checks_catch_a_planted_cycle_and_an_upward_import(tmp_path):
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "__init__.py").write_text("")
    (tmp_path / "passes" / "run.py").write_text("from ..selection import pick\n")
    (tmp_path / "selection.py").write_text("from .passes import run\n")
    (tmp_path / "config.py").write_text("import os\nif TYPE_CHECKING:\n    from .selection import x\n")
    (tmp_path / "__init__.py").write_text("from . import config\n")
    graph = import_graph(tmp_path)
    assert graph["config"] == set() and graph[""] == {"config"}
    assert cycles(graph) == [["passes.run", "selection"]]
    assert upward_imports(graph) == ["passes.run -> selection"]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("somewhere_new")


# what the model's handle (sglp_llm.model.handle) carries: no function takes one of these beside a
# model (a model object: a parameter of one of these names not annotated as a name or path)
HANDLE_FIELDS = {"layers_path", "onload_device", "loader", "layers"}
MODEL_PARAMETERS = {"model", "teacher", "student"}
# where a model's blocks are found and its handle is made, from a model and those settings
WHERE_HANDLES_ARE_MADE = {"model.blocks.find_decoder_blocks", "model.handle.of"}


def loose_handle_arguments(package: Path = PACKAGE) -> list[str]:
    """Functions that take a model and, beside it, something its handle already knows."""
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                models = {a.arg for a in arguments if a.arg in MODEL_PARAMETERS
                          and not (a.annotation is not None and ast.unparse(a.annotation).startswith("str"))}
                loose = sorted({a.arg for a in arguments} & HANDLE_FIELDS)
                name = f"{_module_name(path, package)}.{node.name}"
                if models and loose and name not in WHERE_HANDLES_ARE_MADE:
                    found.append(f"{name}({', '.join(loose)})")
    return found


def test_no_function_takes_a_model_beside_what_its_handle_knows():
    assert loose_handle_arguments() == []


def test_the_loose_argument_check_catches_one(tmp_path):
    (tmp_path / "run.py").write_text("def run(model, batches, *, layers_path=None):\n    pass\n"
                                     "def fine(handle, batches):\n    pass\n"
                                     "def load(model: str, *, layers_path=None):\n    pass\n")
    assert loose_handle_arguments(tmp_path) == ["run.run(layers_path)"]
