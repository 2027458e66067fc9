"""The house: one import namespace, layers that point one way, and concepts written once.

Layers, from the ground up (a module may import its own layer and the layers below it, never one above):

    segpipe.core (segpipe/core/, and segpipe/__init__.py) < segpipe.models (models/) < segpipe.pipeline (pipeline/)
    < segpipe.flows (flows/) < segpipe.cli (segpipe/cli/)

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
    found = [(REPO / "segpipe" / "__init__.py", "segpipe", 0)]
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
    return 0 if name == "segpipe" else None


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
