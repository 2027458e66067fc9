"""Every Python block of the README runs, in order, as a user would paste it (in a folder of their own beside a
copy of ``tests/data``), so the README's Python cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("odc.stac")
pytest.importorskip("rioxarray")

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(markdown: str) -> list[str]:
    """The fenced ```python blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```$", markdown, flags=re.S | re.M)


def test_the_readme_has_python_examples() -> None:
    assert len(python_blocks((ROOT / "README.md").read_text())) >= 3


def test_every_readme_python_block_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGPIPE_HOME", str(tmp_path / "home"))
    namespace: dict[str, object] = {}
    for k, block in enumerate(python_blocks((ROOT / "README.md").read_text())):
        exec(compile(block, f"README.md python block {k + 1}", "exec"), namespace)
    assert (tmp_path / "lausanne.copy.tif").is_file()
    assert list((tmp_path / "home").glob("mask-*.tif"))  # output=None: the masks in $SEGPIPE_HOME
