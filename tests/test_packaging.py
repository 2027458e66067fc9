"""What a user installs is what the README says: the Dockerfile's install steps are the README's, the package's
metadata is complete, and ``segpipe --version`` reports the installed distribution."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import metadata, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pip_installs(text: str) -> set[str]:
    """Every ``pip install ...`` command in ``text``, with the venv prefix and ``RUN`` dropped, spaces collapsed."""
    found = re.findall(r"(?:RUN\s+)?(?:\.venv/bin/)?pip install [^\n]+", text)
    return {" ".join(line.removeprefix("RUN").split()).removeprefix(".venv/bin/") for line in found}


def test_the_dockerfile_installs_as_the_readme_says() -> None:
    docker = _pip_installs((ROOT / "Dockerfile").read_text())
    readme = _pip_installs((ROOT / "README.md").read_text())
    assert docker, "no pip install in the Dockerfile"
    assert docker <= readme, f"Dockerfile steps not in the README: {sorted(docker - readme)}"
    copied = set(re.findall(r"^COPY (\S+)", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert {"segpipe", "pipeline", "flows", "models"} <= copied  # the folders the package maps


def test_package_metadata_is_complete() -> None:
    meta = metadata("segpipe")
    assert meta["Name"] == "segpipe" and meta["Version"] == version("segpipe")
    assert "Apache-2.0" in (meta.get("License-Expression") or meta.get("License") or "")
    assert meta["Summary"] and meta["Requires-Python"] == ">=3.11"
    requires = " ".join(meta.get_all("Requires-Dist") or [])
    for package in ("torch", "ray", "rasterio", "zarr", "prefect"):
        assert package in requires
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_version_flag_prints_the_installed_version() -> None:
    done = subprocess.run([sys.executable, "-m", "segpipe.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout.strip() == f"segpipe {version('segpipe')}"
