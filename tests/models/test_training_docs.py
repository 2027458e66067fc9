"""docs/training.md cannot rot: its ```python and ```bash blocks run, in order, in a fresh folder beside
``tests/data``, and what the page says they give is checked; its table of defaults is TrainConfig's.

A ``segpipe`` command runs in this process (:func:`segpipe.cli.main`; a process per command would spend seconds
importing torch each time), any other line in bash. A comment line ``# error: TEXT`` after a command says the command
stops with that one-line error (``...`` elides part of it), ``# without a CUDA GPU: error: TEXT`` the same where torch
sees no GPU."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "training.md"
NO_GPU = "# without a CUDA GPU: error: "


def blocks(markdown: str) -> list[tuple[str, str]]:
    """(language, text) of the fenced python and bash blocks, in order."""
    return re.findall(r"^```(python|bash)\n(.*?)^```$", markdown, flags=re.S | re.M)


def commands(block: str) -> list[tuple[str, str | None]]:
    """(command, the error it is expected to stop with, or None) of a bash block; continuations joined."""
    found: list[tuple[str, str | None]] = []
    joined = ""
    for raw in block.splitlines():
        line = raw.strip()
        expected = line.replace(NO_GPU, "# error: ", 1) if not torch.cuda.is_available() else line
        if expected.startswith("# error: ") and found:
            found[-1] = (found[-1][0], expected.removeprefix("# "))
            continue
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            joined += line[:-1].strip() + " "
            continue
        found.append((joined + line, None))
        joined = ""
    return found


def run_command(command: str, expected: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    from segpipe.cli import main

    if not command.startswith("segpipe "):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return
    capsys.readouterr()
    code = main(shlex.split(command)[1:])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    if expected is None:
        assert code == 0, f"{command}: {err}"
        return
    assert code == 2 and len(err) == 1, f"{command}: exit {code}, {err}"
    position = 0
    for part in expected.split("..."):
        found = err[0].find(part, position)
        assert found >= 0, f"{command}: expected {expected!r}, got {err[0]!r}"
        position = found + len(part)


def test_every_block_of_the_training_guide_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEGPIPE_HOME", str(tmp_path / "home"))
    found = blocks(PAGE.read_text())
    assert [language for language, _ in found].count("bash") >= 5
    for k, (language, block) in enumerate(found):
        if language == "python":
            exec(compile(block, f"docs/training.md block {k + 1}", "exec"), {})
            continue
        for command, expected in commands(block):
            run_command(command, expected, capsys)

    # what the page says of its runs
    water = json.loads((tmp_path / "runs" / "water" / "best.json").read_text())
    assert water["bands"] == ["blue", "green", "red", "nir"] and water["arguments"]["in_channels"] == 4
    assert water["input"] == {"dtype": "int16", "range": [-32768.0, 32767.0], "scaling": "refuse"}
    assert (water["tile_size"], water["halo"]) == (1024, 32)
    fit = json.loads((tmp_path / "water.summary.json").read_text())["fit"]
    assert (fit["bands"], fit["bands_by"]) == ([2, 3, 4, 8], "names")
    buildings = json.loads((tmp_path / "runs" / "buildings" / "best.json").read_text())
    assert buildings["bands"] == ["pan"] and [c["name"] for c in buildings["classes"]] == ["background", "building"]
    more = json.loads((tmp_path / "runs" / "water-more" / "best.json").read_text())
    assert more["provenance"]["init"].endswith("runs/water/best.safetensors") and more["mean"] == water["mean"]
    assert (tmp_path / "buildings.tif").is_file() and not (tmp_path / "runs" / "refused").exists()


def test_the_table_of_defaults_is_the_configuration() -> None:
    from segpipe.core.options import options_of
    from segpipe.models.training.config import DEFAULT_ARCHITECTURE, TrainConfig

    defaults = {f.flag: f.default for f in options_of(TrainConfig)}
    defaults["--architecture"] = DEFAULT_ARCHITECTURE
    rows = re.findall(r"^\| `(--[a-z-]+)` \| `([^`]*)` \|", PAGE.read_text(), flags=re.M)
    assert len(rows) >= 10
    for flag, shown in rows:
        assert str(defaults[flag]) == shown, f"docs/training.md says {flag} defaults to {shown}, not {defaults[flag]}"
