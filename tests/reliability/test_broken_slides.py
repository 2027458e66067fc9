"""A whole-slide image whose levels are broken (tile data zeroed, the file cut short) is refused with one error line
and exit 2, and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline.test_slides import write_slide


def _broken(path: Path, how: str) -> Path:
    data = write_slide(path.with_name("whole.tiff"), levels=3).read_bytes()
    n = len(data)
    path.write_bytes(data[: n // 3] + bytes(n // 3) + data[2 * n // 3 :] if how == "zeroed" else data[: int(n * 0.6)])
    return path


@pytest.mark.parametrize("how", ["zeroed", "cut"])
def test_a_slide_with_broken_levels_is_one_error_line(how: str, rgb_checkpoint: Path, tmp_path: Path) -> None:
    slide = _broken(tmp_path / "slide.tiff", how)
    out = tmp_path / "mask.ome.tif"
    done = subprocess.run(
        [sys.executable, "-m", "segpipe.cli", "run", str(slide), str(out), "--model", str(rgb_checkpoint),
         "--resolution", "native", "--tissue", "none", "--no-prefect", "--executor", "local"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "truncated or corrupt" in errors[0] and "Traceback" not in done.stderr
    assert not out.exists() and not list(tmp_path.glob(".mask.ome.tif*"))
