"""The code's layers: no import runs back up, no module-level import circle, and the engine names
no task and no metric (it asks the run's task).

Every module under ``deflect/``, ``datasets/``, ``segmentors/`` and ``run.py`` is parsed with
``ast``: all its imports count, those inside functions and under ``TYPE_CHECKING`` too.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Bottom to top: a unit may import its own layer and those below it, never one above.
LAYERS = [
    # engine-neutral helpers
    {
        "deflect.data",
        "deflect.io",
        "deflect.rasters",
        "deflect.pictures",
        "deflect.geotiff",
        "deflect.tiling",
    },
    {"deflect.encoders"},
    {"deflect.tuners"},
    # the package's facade (lazy names), the datasets and the heads
    {"deflect", "datasets", "segmentors"},
    {"deflect.tasks"},
    {"deflect.engine", "deflect.launch"},
    {"deflect.predict", "deflect.export"},
    {"run"},
]


def modules() -> dict[str, Path]:
    """Dotted module name -> file."""
    files = [*REPO.glob("deflect/**/*.py"), *REPO.glob("datasets/**/*.py"),
             *REPO.glob("segmentors/**/*.py"), REPO / "run.py"]  # fmt: skip
    out = {}
    for path in files:
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def unit(module: str) -> str:
    """The layer unit of a module: ``deflect.<package or module>``, or its top folder."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "deflect" and len(parts) > 1 else parts[0]


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every import of the file, resolved to
    the framework's own modules (``from pkg import submodule`` names the submodule)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [
                f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module
                for alias in node.names
            ]
        for target in targets:
            while target and target not in MODULES:  # import a.b.c of a package: its module
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno, id(node) not in in_function))
    return found


def layer_of(module: str) -> int:
    placed = [i for i, units in enumerate(LAYERS) if unit(module) in units]
    assert placed, f"{unit(module)} ({MODULES[module]}) is in no layer: add it to LAYERS"
    return placed[0]


def test_no_import_runs_back_up():
    """A module imports only its own layer and those below (function-level imports and
    type-only imports included)."""
    upward = []
    for name, path in MODULES.items():
        for target, line, _ in imports(name, path):
            if layer_of(target) > layer_of(name):
                upward.append(f"{path.relative_to(REPO)}:{line} ({unit(name)}) imports "
                              f"{target} ({unit(target)})")  # fmt: skip
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_level_import_circle():
    """Imports at module level (``TYPE_CHECKING`` ones too) form no circle between modules."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in MODULES.items():
        for target, _, top in imports(name, path):
            if top and target != name:
                edges[name].add(target)
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_known_circle():
    """The cycle search itself, on a graph with a known circle and one without."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def banned_names() -> set[str]:
    """Every task's name and every metric it can monitor (each task built with its defaults
    and with each of its boolean options flipped), and the metric names of the issue."""
    from deflect.tasks import TASKS

    names = set(TASKS)
    for cls in TASKS.values():
        variants = [{}] + [
            {key: not p.default}
            for key, p in inspect.signature(cls).parameters.items()
            if isinstance(p.default, bool)
        ]
        for options in variants:
            names.update(cls(**options).monitors)
    return names | {"accuracy", "rmse", "mae", "r2", "IoU", "confusion_matrix"}


def docstring_lines(tree: ast.AST) -> set[int]:
    """The lines of the module's, classes' and functions' docstrings."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def named(source: str, banned: set[str]) -> list[tuple[int, str]]:
    """``(line, word)`` for each banned word in a name or a string of ``source`` (comments and
    docstrings aside)."""
    skip = docstring_lines(ast.parse(source))
    words = re.compile(r"\b(" + "|".join(sorted(map(re.escape, banned))) + r")\b")
    hits = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.string in banned:
            hits.append((token.start[0], token.string))
        elif token.type == tokenize.STRING and token.start[0] not in skip:
            hits += [(token.start[0], m.group(1)) for m in words.finditer(token.string)]
    return hits


def test_the_scan_sees_names_and_strings_but_not_comments_or_docstrings():
    source = '"""About mIoU."""\nx = task.mIoU  # mIoU\ny = "mean mIoU"\nz = "mIoUx"\n'
    assert named(source, {"mIoU"}) == [(2, "mIoU"), (3, "mIoU")]


@pytest.mark.parametrize(
    "path",
    [
        *sorted(REPO.glob("deflect/engine/**/*.py")),
        REPO / "run.py",
    ],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_the_engine_names_no_task_and_no_metric(path):
    hits = named(path.read_text(), banned_names())
    assert not hits, f"{path.relative_to(REPO)} names " + ", ".join(
        f"{word!r} (line {line})" for line, word in hits
    )


@pytest.mark.parametrize(
    "path", sorted(REPO.glob("deflect/predict/**/*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_prediction_names_no_task(path):
    """Scene prediction asks the run's task (or the registry's default) and names none: no
    task's name, class or metric."""
    from deflect.tasks import TASKS

    banned = banned_names() | {cls.__name__ for cls in TASKS.values()}
    hits = named(path.read_text(), banned)
    assert not hits, f"{path.relative_to(REPO)} names " + ", ".join(
        f"{word!r} (line {line})" for line, word in hits
    )
