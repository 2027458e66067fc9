"""A TorchScript or ONNX model whose output is not what its sidecar says (an argmax of integers, the wrong rank,
the wrong class count) is one line and exit 2, with nothing written; never a traceback or a garbage mask."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.models.test_byo import MEAN, STD, TinyNet


class Argmax(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).argmax(dim=1, keepdim=True).repeat(1, 3, 1, 1)  # int64, the right shape


class Squeezed(TinyNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, 0]  # (B, H, W)


class FiveClasses(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Conv2d(3, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(super().forward(x))


def segpipe(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "segpipe.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good TorchScript model and the sidecar ``segpipe model init`` wrote for it (3 classes, RGB)."""
    folder = tmp_path_factory.mktemp("good")
    path = folder / "net.pt"
    torch.jit.save(torch.jit.trace(TinyNet().eval(), torch.zeros(1, 3, 32, 32)), str(path))
    done = segpipe("model", "init", path, "--classes", "a,b,c", "--bands", "red,green,blue", "--mean", MEAN,
                   "--std", STD, "--input-dtype", "uint8", cwd=folder)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return folder


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (Argmax, "returned int64 values, expected float logits"),
        (Squeezed, ", 100, 100) for input"),
        (FiveClasses, ", 5, 100, 100) for input"),
    ],
    ids=["integers", "rank", "classes"],
)
def test_a_model_whose_output_is_not_its_sidecars_is_one_line(
    network: type[nn.Module], message: str, sidecar: Path, data_dir: Path, tmp_path: Path
) -> None:
    for file in sidecar.iterdir():
        shutil.copy(file, tmp_path / file.name)
    torch.jit.save(torch.jit.trace(network().eval(), torch.zeros(1, 3, 32, 32)), str(tmp_path / "net.pt"))
    run = segpipe("run", data_dir / "RGB.byte.tif", tmp_path / "m.tif", "--model", tmp_path / "net.pt",
                  "--tile-size", "94", "--halo", "3", "--no-prefect", "--executor", "local", cwd=tmp_path)  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and message in lines[0], run.stderr
    assert not (tmp_path / "m.tif").exists() and not list(tmp_path.glob(".m.tif*"))
