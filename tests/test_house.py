"""The house: one import namespace, layers that point one way, and concepts written once.

Layers, from the ground up (a module may import its own layer and the layers below it, never one above):

    segpipe.core (segpipe/core/) < segpipe.models (models/) < segpipe.pipeline (pipeline/) < segpipe.flows (flows/)
    < segpipe.cli (segpipe/cli/), segpipe.api (segpipe/api.py) and the package root (segpipe/__init__.py, the front
    door: it hands out the API)

Every import is read from the source with ``ast``, those inside functions and ``TYPE_CHECKING`` blocks included.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Source folder -> (module prefix, layer).
FOLDERS = {
    "segpipe/core": ("segpipe.core", 0),
    "models": ("segpipe.models", 1),
    "pipeline": ("segpipe.pipeline", 2),
    "flows": ("segpipe.flows", 3),
    "segpipe/cli": ("segpipe.cli", 4),
}
LAYER_OF_PREFIX = {prefix: layer for prefix, layer in FOLDERS.values()}


def package_files() -> list[tuple[Path, str, int]]:
    """(file, module name, layer) of every module of the package."""
    roof = FOLDERS["segpipe/cli"][1]
    found = [(REPO / "segpipe" / "__init__.py", "segpipe", roof), (REPO / "segpipe" / "api.py", "segpipe.api", roof)]
    for folder, (prefix, layer) in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((prefix, *[p for p in parts if p != "__init__"]))
            found.append((path, name, layer))
    return found


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found += [(node.lineno, name)] + [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return found


def layer_of(name: str) -> int | None:
    for prefix, layer in sorted(LAYER_OF_PREFIX.items(), key=lambda kv: -len(kv[0])):
        if name == prefix or name.startswith(prefix + "."):
            return layer
    return FOLDERS["segpipe/cli"][1] if name in ("segpipe", "segpipe.api") else None


def test_package_layout_is_what_the_test_reads() -> None:
    names = {name for _, name, _ in package_files()}
    assert {
        "segpipe.core.errors",
        "segpipe.models.checkpoint",
        "segpipe.pipeline.run",
        "segpipe.flows.segment",
    } <= names
    assert "segpipe.cli" in names and len(names) > 50


def test_no_import_points_up_and_none_bypasses_the_namespace() -> None:
    problems = []
    for path, module, layer in package_files():
        for line, name in imported_modules(path, module):
            where = f"{path.relative_to(REPO)}:{line}"
            if name.split(".")[0] in ("pipeline", "models", "flows"):
                problems.append(f"{where} imports {name!r}: use segpipe.{name}")
            target = layer_of(name)
            if target is not None and target > layer:
                problems.append(f"{where} ({module}, layer {layer}) imports {name} (layer {target})")
    assert not problems, "\n".join(problems)


def test_the_layer_check_finds_an_upward_import(tmp_path: Path) -> None:
    """The check above can fail: an import of the pipeline from a model module is found."""
    source = tmp_path / "net.py"
    source.write_text("def f():\n    from segpipe.pipeline.run import run_scene\n    return run_scene\n")
    found = [(line, name) for line, name in imported_modules(source, "segpipe.models.net") if layer_of(name) == 2]
    assert found and found[0][0] == 2


def _calls(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every call in a file, e.g. ``(12, "os.replace")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            parts = []
            func = node.func
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
                found.append((node.lineno, ".".join(reversed(parts))))
    return found


def _definitions(path: Path) -> list[str]:
    return [n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef | ast.ClassDef)]


def _where(predicate: object) -> set[str]:
    return {
        str(path.relative_to(REPO))
        for path, _, _ in package_files()
        if predicate(path)  # type: ignore[operator]
    }


def test_concepts_are_written_once() -> None:
    """One normaliser, one colour decoder, one atomic writer, one core count, one device resolver, one place
    that opens rasters for reading."""
    assert _where(lambda p: "normalise" in _definitions(p)) == {"segpipe/core/pixels.py"}
    assert _where(lambda p: any(name == "os.replace" for _, name in _calls(p))) == {"segpipe/core/files.py"}
    assert _where(lambda p: any(name in ("os.cpu_count", "os.sched_getaffinity") for _, name in _calls(p))) == {
        "segpipe/core/runtime.py"
    }
    assert _where(lambda p: any(name == "int" and "16)" in line for name, line in _call_lines(p))) == {
        "segpipe/core/colours.py"
    }
    devices = _where(
        lambda p: any("device" in d and d.startswith(("_pick", "_local", "resolve")) for d in _definitions(p))
    )
    assert devices == {"segpipe/core/runtime.py"}
    readers = _where(lambda p: any(name == "rasterio.open" and '"w"' not in line for name, line in _call_lines(p)))
    assert readers == {"segpipe/core/raster.py"}


def _call_lines(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text().splitlines()
    return [(name, lines[line - 1]) for line, name in _calls(path)]


def test_a_folder_is_importable_only_under_its_segpipe_name() -> None:
    """From the repository root (where ``pipeline/`` is on the path), ``import pipeline`` refuses."""
    for name in ("pipeline", "models", "flows"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and f"import segpipe.{name}, not {name}" in result.stderr, result.stderr


USER_FLOW = '''
"""A user's Prefect project with its own models/ and pipeline/ packages, using segpipe."""
import json, sys

import models, pipeline  # the user's own
from prefect import flow

import segpipe
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings


@flow(name="user_flow", persist_result=False)
def user_flow(scene: str, out: str, model: str) -> dict:
    return run_scene(RunSettings(input=scene, output=out, model=model, executor="local", tile_size=64, halo=16))


if __name__ == "__main__":
    summary = user_flow(sys.argv[1], sys.argv[2], sys.argv[3])
    print(json.dumps({
        "user_models": models.WHO, "user_pipeline": pipeline.WHO, "segpipe": segpipe.__file__,
        "tiles": summary["tiles"]["computed"],
    }))
'''


@pytest.mark.timeout(900)
def test_wheel_installs_only_segpipe_and_runs_beside_a_users_models_and_pipeline(
    tmp_path: Path, data_dir: Path, rgb_checkpoint: Path
) -> None:
    """Build the wheel, install it (not editable) into a fresh virtualenv, and from a folder holding its own
    ``models/`` and ``pipeline/`` packages run a scene through a Prefect flow defined in that folder."""
    import zipfile

    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("segpipe-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"segpipe"}, tops
    names = zipfile.ZipFile(wheel).namelist()
    assert "segpipe/models/weights/default.safetensors" in names and "segpipe/pipeline/run.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # what pip install does for a pure wheel, without needing pip
        archive.extractall(site)
    # The dependencies (torch, prefect, ...) come from the test environment's site-packages, appended after the
    # fresh venv's own, so the venv's segpipe (the wheel) comes first. A path line in a .pth file does not run
    # the .pth files of that folder, so the editable install of this checkout is not seen.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (Path(site) / "test-dependencies.pth").write_text("\n".join(deps) + "\n")

    project = tmp_path / "project"
    for package in ("models", "pipeline"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").write_text(f'WHO = "the user\'s {package}"\n')
    (project / "flow.py").write_text(USER_FLOW)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "TMPDIR": str(tmp_path),
    }
    result = subprocess.run(
        [str(python), "flow.py", str(data_dir / "RGB.byte.tif"), str(tmp_path / "mask.tif"), str(rgb_checkpoint)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["user_models"] == "the user's models" and report["user_pipeline"] == "the user's pipeline"
    assert report["segpipe"].startswith(site) and report["tiles"] > 0
    assert (tmp_path / "mask.tif").is_file()


# --- the house, measured: size of functions, cycles, lazy imports, concepts written twice ----------------------

#: Longest function (lines from ``def`` to its last line, decorators aside) in the package and the benchmarks.
MAX_FUNCTION_LINES = 60

#: Public functions that may share a name across modules, and why.
SHARED_NAMES = {
    "main": "each script's entry point",
    "segment_dataset": "segpipe.api.segment_dataset calls the flow of that name with keyword options",
}


def source_files(*, benchmarks: bool = False) -> list[Path]:
    """The package's modules (and the benchmarks' when asked)."""
    found = [path for path, _, _ in package_files()]
    if benchmarks:
        found += sorted((REPO / "benchmarks").glob("*.py"))
    return found


def _functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def _label(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (N lines)`` of every function longer than ``limit`` lines."""
    found = []
    for path in paths:
        for node in _functions(ast.parse(path.read_text())):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                found.append(f"{_label(path)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    """Every function of the package and the benchmarks fits on a screen (60 lines)."""
    assert not long_functions(source_files(benchmarks=True)), "\n".join(long_functions(source_files(benchmarks=True)))


def test_the_length_check_finds_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n    return x0\n")
    assert long_functions([tmp_path / "long.py"]) == ["long.py:1 f (62 lines)"]
    assert long_functions([tmp_path / "long.py"], limit=62) == []


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines of the imports under ``if TYPE_CHECKING:`` (annotations only: never run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    return lines


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at the top or inside functions (``TYPE_CHECKING`` imports left
    out). ``from package import name`` counts as an import of ``package.name`` when that is a module."""
    modules = {name: path for path, name, _ in package_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        targets = set()
        for line, imported in imported_modules(path, name):
            if line in skip:
                continue
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
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


def test_no_import_cycle_not_even_one_held_apart_inside_a_function() -> None:
    assert not cycles(import_graph()), cycles(import_graph())


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def function_level_imports(path: Path) -> list[tuple[int, str]]:
    """(line, source line) of every import inside a function."""
    lines = path.read_text().splitlines()
    found = []
    for function in _functions(ast.parse(path.read_text())):
        for node in ast.walk(function):
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append((node.lineno, lines[node.lineno - 1].strip()))
    return sorted(set(found))


def test_every_lazy_import_says_why() -> None:
    """An import inside a function is there for start-up time (measured: torch 2 s, Prefect 1.2 s, ...) or for an
    optional extra, and says so on its line: ``# lazy: <reason>``."""
    unexplained = [
        f"{path.relative_to(REPO)}:{line}: {text}"
        for path in source_files(benchmarks=True)
        for line, text in function_level_imports(path)
        if "# lazy:" not in text
    ]
    assert not unexplained, "\n".join(unexplained)


def test_local_or_remote_is_asked_in_the_ground_only() -> None:
    """Only the ground (``segpipe/core``: Location, object storage, locks) asks whether a path is an object URL;
    the stages use :class:`segpipe.core.location.Location`."""
    asking = _where(lambda p: any(name.endswith("is_object_url") for _, name in _calls(p)))
    assert asking and all(place.startswith("segpipe/core/") for place in asking), asking


def test_registries_are_filled_where_they_are_declared() -> None:
    """No module adds itself to another module's registry (an import then has a side effect): no assignment to an
    imported name's item at module level."""
    found = []
    for path in source_files():
        tree = ast.parse(path.read_text())
        imported = {
            (alias.asname or alias.name).split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            for target in targets:
                base = target.value if isinstance(target, ast.Subscript) else None
                while isinstance(base, ast.Attribute | ast.Subscript):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in imported:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "\n".join(found)


class _Shape(ast.NodeTransformer):
    """A function body with its names, attributes, keywords and constants blanked: what it does, not what it calls
    its things."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id="_", ctx=node.ctx), node)

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.arg, node.annotation = "_", None
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        return ast.copy_location(ast.Constant(value=0), node)

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        node.attr = "_"
        return node

    def visit_keyword(self, node: ast.keyword) -> ast.AST:
        self.generic_visit(node)
        node.arg = "_"
        return node


def shape(function: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, int]:
    """(fingerprint of the body's shape, statements in it), docstring aside."""
    body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    copy = ast.parse(ast.unparse(ast.Module(body=body, type_ignores=[])) or "pass")
    statements = sum(isinstance(n, ast.stmt) for n in ast.walk(copy))
    return ast.dump(_Shape().visit(copy)), statements


def written_twice(paths: list[Path], *, min_statements: int = 5) -> list[str]:
    """Functions written twice: any two with the same shape (names and values aside) and at least
    ``min_statements`` statements, or two module-level functions with the same name and shape at any size (a
    helper copied to a second module). Methods of one name and shape (``close``, ``__enter__``) implement a
    protocol; they are not counted by name."""
    seen: dict[tuple[str, str], str] = {}
    found = []
    for path in paths:
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for function in _functions(tree):
            fingerprint, statements = shape(function)
            where = f"{_label(path)}:{function.lineno} {function.name}"
            keys = [("shape", fingerprint)] if statements >= min_statements else []
            if id(function) in top and function.name not in SHARED_NAMES:
                keys.append((function.name, fingerprint))
            for key in keys:
                if key in seen and seen[key].split(":")[0] != where.split(":")[0]:
                    found.append(f"{where} is {seen[key]} again")
                seen.setdefault(key, where)
    return found


def test_no_function_is_written_twice() -> None:
    assert not written_twice(source_files()), "\n".join(written_twice(source_files()))


def test_the_twice_check_finds_a_copied_helper(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def _beside(folder, name):\n    return folder + '/' + name\n")
    (tmp_path / "b.py").write_text("def _beside(dir, n):\n    return dir + '/' + n\n")
    long = "def f(x):\n" + "".join(f"    x = x + {i}\n" for i in range(5)) + "    return x\n"
    (tmp_path / "c.py").write_text(long)
    (tmp_path / "d.py").write_text(long.replace("def f(x)", "def g(y)").replace("x", "y"))
    found = written_twice([tmp_path / n for n in ("a.py", "b.py", "c.py", "d.py")])
    assert len(found) == 2 and "_beside" in found[0] and " g " in found[1].replace(":", " "), found


def test_public_functions_have_one_meaning() -> None:
    """A public function's name means one thing in the package: two modules defining the same name (beyond
    :data:`SHARED_NAMES`) is one concept written twice, or two concepts under one name."""
    owners: dict[str, list[str]] = {}
    for path in source_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                owners.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    twice = {name: places for name, places in owners.items() if len(places) > 1 and name not in SHARED_NAMES}
    assert not twice, twice


def environment_reads(path: Path) -> set[str]:
    """The environment variables a module reads or sets by name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        key = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            owner = node.func.value
            environ = isinstance(owner, ast.Attribute) and owner.attr == "environ"
            if (environ and node.func.attr in ("get", "setdefault", "pop")) or node.func.attr == "getenv":
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.add(key.value)
    return found


def test_each_environment_variable_is_read_in_one_place() -> None:
    """A setting from the environment (its name and its default) is stated by one module."""
    owners: dict[str, list[str]] = {}
    for path in source_files():
        for key in environment_reads(path):
            owners.setdefault(key, []).append(str(path.relative_to(REPO)))
    twice = {key: places for key, places in owners.items() if len(places) > 1}
    assert not twice, twice


#: Flags the CLI declares by hand: the root parser's own, and ``--config``, which names where the options come from.
HAND_FLAGS = {"-v", "--verbose", "--version", "--config"}


def hand_declared_flags(path: Path) -> list[str]:
    """``file:line --flag`` of every ``add_argument`` call that declares a ``--flag`` itself."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            found += [f"{_label(path)}:{node.lineno} {flag}" for flag in flags if flag not in HAND_FLAGS]
    return found


def test_every_option_comes_from_one_declaration() -> None:
    """The CLI declares no option by hand: every flag comes from an ``option`` field of a settings dataclass
    (:func:`segpipe.core.options.add_arguments`), so its default, help and checks live in one place."""
    found = [flag for path in sorted((REPO / "segpipe" / "cli").rglob("*.py")) for flag in hand_declared_flags(path)]
    assert not found, "\n".join(found)
