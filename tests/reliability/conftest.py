"""Fixtures of the reliability tests: the CLI in-process (exit code, stdout, one-line stderr), per-test locks."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class CliResult:
    """What ``segpipe`` did: exit code, stdout, stderr (file-descriptor level: GDAL's own prints included)."""

    code: int
    out: str
    err: str

    @property
    def summary(self) -> dict[str, Any]:
        assert self.code == 0, self.err
        return json.loads(self.out)


Cli = Callable[..., CliResult]


@pytest.fixture(autouse=True)
def lock_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's runs lock in their own folder (and child processes inherit it), not in the shared /tmp."""
    path = tmp_path / "locks"
    monkeypatch.setenv("SEGPIPE_LOCK_DIR", str(path))
    return path


@pytest.fixture
def cli(capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """Run ``segpipe ARGS`` in this process through :func:`segpipe.cli.main`.

    Warnings are logged to stderr as the real command does (``warning: ...``); stderr is captured at the file
    descriptor, so anything GDAL prints itself shows up too.
    """
    from segpipe.cli import main

    for name, value in (("RAY_DEDUP_LOGS", "0"), ("PREFECT_LOGGING_LEVEL", "WARNING")):
        monkeypatch.setenv(name, value)  # main() sets these defaults; restore them after the test

    def run(*args: object) -> CliResult:
        capfd.readouterr()
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        root = logging.getLogger()
        root.addHandler(handler)
        try:
            code = main([str(arg) for arg in args])
        finally:
            root.removeHandler(handler)
        out, err = capfd.readouterr()
        return CliResult(code, out, err)

    return run


def assert_refused(result: CliResult, message: str | re.Pattern[str], *empty_dirs: Path) -> None:
    """Exit 2, exactly one stderr line ``error: MESSAGE`` (a string: equal; a pattern: full match), no traceback,
    and nothing in ``empty_dirs``."""
    assert result.code == 2, (result.code, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert "Traceback" not in result.err
    assert lines[0].startswith("error: "), lines[0]
    text = lines[0].removeprefix("error: ")
    if isinstance(message, str):
        assert text == message
    else:
        assert message.fullmatch(text), f"{text!r} does not match {message.pattern!r}"
    for folder in empty_dirs:
        assert sorted(p.name for p in folder.iterdir()) == [], f"left behind in {folder}"
