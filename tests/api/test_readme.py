"""Every ```bash and ```python block of the README, and the ```python blocks of docs/python.md, runs, in order, as a
user would paste it (in a folder of their own beside a copy of ``tests/data``), so those examples cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("odc.stac")
pytest.importorskip("rioxarray")

ROOT = Path(__file__).resolve().parents[2]


def blocks(markdown: str, language: str) -> list[str]:
    """The fenced blocks of ``language`` in a Markdown text, in order."""
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, flags=re.S | re.M)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGPIPE_HOME", str(tmp_path / "home"))
    return tmp_path


def test_the_readme_has_examples() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(blocks(text, "python")) >= 3 and len(blocks(text, "bash")) >= 2


def _run_bash(block: str, where: str, folder: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{where} failed:\n{block}\n{done.stderr[-3000:]}"


def test_every_readme_block_runs(folder: Path) -> None:
    text = (ROOT / "README.md").read_text()
    for k, block in enumerate(blocks(text, "bash")):
        _run_bash(block, f"README.md bash block {k + 1}", folder)
    assert (folder / "lausanne.tif").is_file() and (folder / "lausanne.gpkg").is_file()
    assert (folder / "masks" / "collection.json").is_file()
    namespace: dict[str, object] = {}
    for k, block in enumerate(blocks(text, "python")):
        exec(compile(block, f"README.md python block {k + 1}", "exec"), namespace)
    assert (folder / "lausanne.copy.tif").is_file()
    assert list((folder / "home").glob("mask-*.tif"))  # output=None: the masks in $SEGPIPE_HOME


#: Guides whose examples another test runs (docs/training.md: tests/models/test_training_docs.py).
RUN_ELSEWHERE = ("training.md",)
GUIDES = [p for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in RUN_ELSEWHERE]


@pytest.mark.parametrize("page", [p for p in GUIDES if "```bash" in p.read_text() or "```python" in p.read_text()],
                         ids=lambda p: p.name)  # fmt: skip
def test_every_block_of_the_guides_runs(page: Path, folder: Path) -> None:
    text = page.read_text()
    for k, block in enumerate(blocks(text, "bash")):
        _run_bash(block, f"docs/{page.name} bash block {k + 1}", folder)
    namespace: dict[str, object] = {}
    for k, block in enumerate(blocks(text, "python")):
        exec(compile(block, f"docs/{page.name} python block {k + 1}", "exec"), namespace)
