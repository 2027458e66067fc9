"""explain and quicklook produce real pictures: right size, many distinct colours, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from segpipe.cli import main
from segpipe.models.explain import received_attention
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings


def png_pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def test_explain_writes_a_png_with_attention_panels(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "explain.png"
    scene = data_dir / "lausanne-1091-322_00.tif"
    assert main(["explain", str(scene), "--size", "128", "--out", str(out)]) == 0
    pixels = png_pixels(out)
    assert pixels.shape[0] in (3, 4) and pixels.shape[2] > 1000  # a wide figure of several panels
    assert len(np.unique(pixels.reshape(pixels.shape[0], -1), axis=1).T) > 100


def test_explain_a_half_resolution_attention_model(make_checkpoint, data_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """With downsample 2 the bottleneck is 1/(2 * 2**depth) of the tile: the self-attention panel must fit it."""
    checkpoint = make_checkpoint(
        "half-attention", architecture="attention_unet", bands=("r", "g", "b"), mean=(100.0,) * 3,
        std=(50.0,) * 3, depth=2, heads=2, window=2, downsample=2,
    )
    out = tmp_path / "explain.png"
    scene = data_dir / "lausanne-1091-322_00.tif"
    assert main(["explain", str(scene), "--model", str(checkpoint), "--size", "64", "--out", str(out)]) == 0
    assert png_pixels(out).shape[2] > 1000


def test_explain_rejects_a_size_the_model_cannot_take(data_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(
        ["explain", str(data_dir / "RGB.byte.tif"), "--size", "100", "--out", str(tmp_path / "x.png")]
    )
    assert code == 2
    assert "must be a multiple of 16" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_received_attention_reassembles_local_windows() -> None:
    # 2x2 windows of 2x2 positions; each window attends only to its first key
    weights = torch.zeros(4, 1, 4, 4)
    weights[:, :, :, 0] = 1.0
    received = received_attention(weights, (4, 4), window=2)
    expected = np.zeros((4, 4), dtype=np.float32)
    expected[::2, ::2] = 1.0
    assert np.array_equal(received, expected)


def test_quicklook_of_a_mask_and_its_scene(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    scene = data_dir / "RGB.byte.tif"
    mask = tmp_path / "m.tif"
    run_scene(RunSettings(input=str(scene), output=str(mask), model=str(rgb_checkpoint), executor="local"))
    out = tmp_path / "q.png"
    assert main(["quicklook", str(mask), "--scene", str(scene), "--max-size", "256", "--out", str(out)]) == 0
    pixels = png_pixels(out)
    assert pixels.shape[2] > pixels.shape[1]  # two panels side by side


@pytest.mark.parametrize(
    "args", [["quicklook", "missing.tif", "--out", "q.png"], ["quicklook", "x.tif", "--out", "q.jpg"]]
)
def test_quicklook_bad_input_is_exit_2(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert list(tmp_path.iterdir()) == []
