"""A filesystem that fills up, for real (a small tmpfs mounted by the test; root only): the work directory or the
output folder full gives one line naming the full location and exit 2, nothing partial at OUTPUT, and once there is
room again the re-run resumes and writes the bytes of a clean run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCENE = Path(__file__).resolve().parents[1] / "data" / "RGB.byte.tif"


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.decode().strip()[:100]}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _grow(folder: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)


def segpipe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_LOGGING_LEVEL"}
    return subprocess.run([sys.executable, "-m", "segpipe.cli", "run", str(SCENE), *args, "--no-prefect",
                           "--executor", "local", "--ingest", "always"], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_full_work_directory_is_one_line_and_a_re_run_resumes(tmp_path: Path) -> None:
    clean = segpipe(str(tmp_path / "clean.tif"))
    assert clean.returncode == 0, clean.stderr
    with small_disk(tmp_path / "small", "256k") as small:
        full = segpipe(str(tmp_path / "m.tif"), "--work-dir", str(small / "work"))
        assert full.returncode == 2, full.stderr
        assert _error_lines(full.stderr) == [
            f"error: the work directory {small / 'work'} is full (no space left on device); free space there or "
            "choose another, then re-run to resume"
        ]
        assert not (tmp_path / "m.tif").exists() and not list(tmp_path.glob(".m.tif*"))
        _grow(small, "16m")
        again = segpipe(str(tmp_path / "m.tif"), "--work-dir", str(small / "work"))
        assert again.returncode == 0, again.stderr
    assert (tmp_path / "m.tif").read_bytes() == (tmp_path / "clean.tif").read_bytes()


@pytest.mark.skipif(sys.platform != "linux", reason="tmpfs mounts are Linux's")
def test_a_full_output_folder_is_one_error_line_and_nothing_partial(tmp_path: Path) -> None:
    with small_disk(tmp_path / "out", "300k") as out:
        full = segpipe(str(out / "m.tif"), "--probabilities", str(out / "p.tif"))
        assert full.returncode == 2, full.stderr
        errors = _error_lines(full.stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: could not write {out}"), full.stderr
        assert errors[0].endswith("; check free space and permissions")
        assert sorted(p.name for p in out.iterdir()) == []  # no mask without its probabilities, no partial file
