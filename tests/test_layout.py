"""The package's shape (issues 17 and 41): no import cycle among difftool's modules, the library never imports
`difftool.cli`, stages import only earlier stages, one module opens image files, every package ships, no module over
500 lines and no function over 80. Imports inside functions count too:
a lazy import is still an edge of the architecture. The tests mirror the package: a folder per package, none over
500 lines either."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "difftool"
TESTS = Path(__file__).resolve().parent
TEST_FOLDERS_BESIDE_THE_PACKAGE = {"benchmarks", "fixtures"}  # the benchmarks' harness; files the tests read
ENTRY_POINTS = {"difftool.train", "difftool.distill", "difftool.sample", "difftool.evaluate", "difftool.img2img",
                "difftool.__main__"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the difftool modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            for target in targets:
                if target in modules and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first repeated at the end), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_sees_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_never_imports_cli():
    graph = import_graph()
    offenders = {name: sorted(e for e in edges if e.startswith("difftool.cli"))
                 for name, edges in graph.items()
                 if not name.startswith("difftool.cli") and name not in ENTRY_POINTS}
    assert {k: v for k, v in offenders.items() if v} == {}



def test_no_module_over_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}


def test_no_test_file_over_500_lines():
    long = {str(p.relative_to(TESTS)): n for p in TESTS.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_test_folders_mirror_the_package():
    """tests/STAGE/ for difftool/STAGE/ (tests/cli/fuzz/ groups the generated cases of the CLI's); a test of a
    top-level module stays in tests/. Each folder is a package, so that two stages may each have a test_job.py."""
    packages = {p.parent.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("__init__.py")} - {"."}
    folders = {p.relative_to(TESTS).as_posix() for p in TESTS.rglob("*") if p.is_dir() and p.name != "__pycache__"}
    folders = {f for f in folders if f.split("/")[0] not in TEST_FOLDERS_BESIDE_THE_PACKAGE}
    stray = sorted(f for f in folders if f.split("/")[0] not in packages)
    assert stray == [], "test folders that mirror no package of difftool"
    missing = sorted(p for p in packages if p.split("/")[0] not in folders and any((PACKAGE / p).glob("[!_]*.py")))
    assert missing == [], "packages without a test folder"
    no_init = sorted(f for f in folders | {"benchmarks"} if not (TESTS / f / "__init__.py").is_file())
    assert no_init == []


def test_no_function_over_80_lines():
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert long == {}


# Each stage may import only the stages before it: data and models are read by everyone, evaluation and inpainting
# use sampling, training uses evaluation (during training), distillation trains. The core modules import no stage.
STAGE_ORDER = ("data", "models", "sampling", "inpainting", "evaluation", "reporting", "training", "distilling")


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGE_ORDER else None


def test_stages_import_only_earlier_stages():
    graph = import_graph()
    later = {}
    for name, edges in graph.items():
        if name.startswith("difftool.cli") or name in ENTRY_POINTS:
            continue
        stage = _stage(name)
        allowed = set(STAGE_ORDER[:STAGE_ORDER.index(stage) + 1]) if stage else set()
        bad = sorted(e for e in edges if _stage(e) and _stage(e) not in allowed)
        if bad:
            later[name] = bad
    assert later == {}


def test_only_images_py_opens_image_files():
    """One decoder (`difftool.images.open_image` / `read_image`) keeps the decompression-bomb guard, the first
    frame and the EXIF rotation the same for every reader."""
    opened = []
    for name, path in _modules().items():
        if name == "difftool.images":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr == "open" and isinstance(node.value, ast.Name)
                    and node.value.id == "Image") or (isinstance(node, ast.ImportFrom) and node.module == "PIL.Image"):
                opened.append(f"{name}:{node.lineno}")
    assert opened == []


def test_every_package_ships_in_the_wheel():
    """pyproject lists its packages by hand (recipes/ is mapped into the package), so a new folder must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found - listed == set()


def test_the_readme_map_names_every_module():
    rows = {}
    for line in (PACKAGE.parent / "README.md").read_text().splitlines():
        if line.startswith("| `difftool/"):
            folder, _, text = line[3:].partition("`")
            rows[folder.rstrip("/")] = text
    missing = {}
    for folder in [PACKAGE, *sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))]:
        key = "difftool" if folder == PACKAGE else f"difftool/{folder.name}"
        text = rows.get(key, "")
        names = [p.name for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
        names += [f"{p.parent.name}/" for p in folder.glob("*/__init__.py")] if folder != PACKAGE else []
        if absent := sorted(n for n in names if f"`{n}" not in text and f"`{n.removesuffix('.py')}`" not in text):
            missing[key] = absent
    assert missing == {}


def test_no_function_takes_more_than_8_parameters():
    """More than 8 and a function is doing several jobs, or its settings want one object (`SamplerSettings`,
    `TrainingState`, `Existing`). The CLI's commands are exempt: their parameters are the command's options."""
    many = {}
    for name, path in _modules().items():
        if name.startswith("difftool.cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs) if a.arg not in ("self", "cls")]
                if len(params) > 8:
                    many[f"{name}.{node.name}"] = len(params)
    assert many == {}
