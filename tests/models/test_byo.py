"""Bring your own model: an ONNX export with a fixed 64 px input and its own JSON of another schema beside it, and a
TorchScript export of any size, made segpipe-ready with ``segpipe model init`` and nothing hand-written; the masks
equal the network applied to the whole image, away from the image's edge (where tiles are mirror-padded and the
whole-image network pads zeros)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from segpipe.core.errors import ModelError
from segpipe.models.checkpoint import load_model
from segpipe.models.signature import inspect_model

ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = 100.0, 50.0
EDGE = 2  # the network's reach: two 3x3 convolutions


class TinyNet(nn.Module):
    """Two 3x3 convolutions (a receptive field of 5 px): (B, 3, H, W) -> (B, 3, H, W) logits, any size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Pooled(nn.Module):
    """Down by 4 and up again: any side must be a multiple of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(2, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.avg_pool2d(nn.functional.avg_pool2d(x, 2), 2)
        return self.head(nn.functional.interpolate(y, scale_factor=4.0))


def segpipe(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "segpipe.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def third_party(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.onnx`` exported with a fixed (1, 3, 64, 64) input, beside the exporter's own ``model.json``."""
    pytest.importorskip("onnx")
    folder = tmp_path_factory.mktemp("vendor")
    torch.onnx.export(
        TinyNet().eval(), (torch.zeros(1, 3, 64, 64),), str(folder / "model.onnx"), input_names=["image"], dynamo=False
    )
    (folder / "model.json").write_text(json.dumps({"model": "tinynet", "data": {"normalize": [MEAN, STD]}}))
    return folder / "model.onnx"


def test_a_foreign_json_beside_the_model_is_never_read_as_segpipes(third_party: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as found:
        load_model(third_party)
    assert "has no segpipe metadata: model.segpipe.json is missing, and model.json beside it is another tool's" in str(
        found.value
    )
    assert "['data', 'model']" in str(found.value) and "segpipe model init" in str(found.value)


def test_model_init_says_what_it_cannot_infer(third_party: Path, tmp_path: Path) -> None:
    done = segpipe("model", "init", third_party, "--bands", "red,green,blue", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr == (
        "error: model.onnx: the model takes 3 band(s) and gives 3 classes, input 64 px; say what it cannot: "
        "--classes ... --mean ... --std ... --input-dtype ...\n"
    )
    assert not third_party.with_name("model.segpipe.json").exists()


def test_an_onnx_model_with_a_fixed_input_runs_with_any_halo_and_matches_the_whole_image(
    third_party: Path, data_dir: Path, tmp_path: Path
) -> None:
    done = segpipe(
        "model", "init", third_party, "--classes", "water:#1F77B4,land,other", "--bands", "red,green,blue",
        "--mean", MEAN, "--std", STD, "--input-dtype", "uint8", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fixed input 64 px (tile 48 + halo 8)" in done.stdout
    written = json.loads(third_party.with_name("model.segpipe.json").read_text())
    assert written["architecture"] == "onnx" and written["input_size"] == 64 and written["arguments"] == {}
    assert written["input"] == {"dtype": "uint8", "range": [0.0, 255.0], "scaling": "refuse"}
    assert written["classes"][0] == {"name": "water", "colour": "#1F77B4"}
    assert json.loads(third_party.with_name("model.json").read_text())["model"] == "tinynet"  # left alone

    scene = data_dir / "RGB.byte.tif"
    with rasterio.open(scene) as src:
        pixels, valid = src.read().astype(np.float32), src.dataset_mask() > 0
    with torch.inference_mode():
        whole = TinyNet().eval()(torch.from_numpy(((pixels - MEAN) / STD * valid)[None])).argmax(1)[0].numpy()
    inner = np.zeros_like(valid)
    inner[EDGE:-EDGE, EDGE:-EDGE] = True
    for halo in (2, 4, 16):  # tiles of 60, 56 and 32 px: any halo at least the network's reach
        out = tmp_path / f"m{halo}.tif"
        run = segpipe("run", scene, out, "--model", third_party, "--halo", halo, "--no-prefect", "--executor", "local",
                      cwd=tmp_path)  # fmt: skip
        assert run.returncode == 0, run.stderr
        with rasterio.open(out) as m:
            mask = m.read(1)
        assert np.array_equal(mask[~valid], np.full((~valid).sum(), 255, np.uint8))
        agree = (mask == whole)[valid & inner].mean()
        assert agree == 1.0, (halo, agree)
    bad = segpipe("run", scene, tmp_path / "x.tif", "--model", third_party, "--tile-size", "60", "--halo", "4",
                  "--no-prefect", cwd=tmp_path)  # fmt: skip
    assert bad.returncode == 2 and "fixed input of 64 pixels but tile size 60 + 2 x halo 4 = 68" in bad.stderr


def test_metadata_named_explicitly(third_party: Path, data_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "meta" / "tiny.json"
    elsewhere.parent.mkdir()
    done = segpipe(
        "model", "init", third_party, "--classes", "a,b,c", "--bands", "red,green,blue", "--mean", MEAN,
        "--std", STD, "--input-dtype", "uint8", "--out", elsewhere, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    loaded = load_model(third_party, metadata=str(elsewhere))
    assert [c.name for c in loaded.metadata.classes] == ["a", "b", "c"]
    run = segpipe("run", data_dir / "RGB.byte.tif", tmp_path / "m.tif", "--model", third_party, "--model-metadata",
                  elsewhere, "--no-prefect", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_a_torchscript_model_of_any_size_gets_its_size_multiple_probed(data_dir: Path, tmp_path: Path) -> None:
    scripted = torch.jit.trace(TinyNet().eval(), torch.zeros(1, 3, 32, 32))
    path = tmp_path / "tiny.pt"
    torch.jit.save(scripted, str(path))
    signature = inspect_model(path, in_channels=3)
    assert (signature.architecture, signature.input_size, signature.classes, signature.size_multiple) == (
        "torchscript",
        None,
        3,
        1,
    )
    pooled = tmp_path / "pooled.pt"
    torch.jit.save(torch.jit.script(Pooled().eval()), str(pooled))
    assert inspect_model(pooled, in_channels=2).size_multiple == 4
    done = segpipe(
        "model", "init", path, "--classes", "a,b,c", "--bands", "red,green,blue", "--mean", MEAN, "--std", STD,
        "--input-dtype", "uint8", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0 and "sizes in multiples of 1" in done.stdout, done.stderr
    run = segpipe("run", data_dir / "RGB.byte.tif", tmp_path / "m.tif", "--model", path, "--tile-size", "100",
                  "--halo", "3", "--no-prefect", "--executor", "local", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
