"""Tiled inference equals whole-image inference (within the receptive field), for every blend.

"Whole-image inference" is the model applied once to the whole scene, mirror-padded by the halo (and on the
right and bottom up to the model's size multiple), nodata pixels zeroed after normalisation: exactly what a
user would run if the scene fitted in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from segpipe.core.pixels import normalise
from segpipe.core.tiles import TileGrid
from segpipe.models.checkpoint import load_model
from segpipe.models.networks import receptive_field_radius
from segpipe.pipeline import store as ws
from segpipe.pipeline.dispatch import run_inference
from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.ingest import ingest
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.scene import Selection
from segpipe.pipeline.stitch import stitch


def whole_image_probabilities(scene: Path, checkpoint: Path, halo: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of the model over the whole scene (classes, H, W), and the scene's validity mask (H, W)."""
    loaded = load_model(checkpoint)
    meta = loaded.metadata
    with rasterio.open(scene) as src:
        data = src.read()
        valid = (src.dataset_mask() > 0).astype(np.uint8)
    _, height, width = data.shape
    m = meta.size_multiple
    extra_y = -(height + 2 * halo) % m
    extra_x = -(width + 2 * halo) % m
    pad = ((halo, halo + extra_y), (halo, halo + extra_x))
    data_p = np.pad(data, ((0, 0), *pad), mode="reflect")
    valid_p = np.pad(valid, pad, mode="reflect")
    x = torch.from_numpy(normalise(data_p, meta.mean, meta.std, valid_p))[None]
    with torch.inference_mode():
        probs = torch.softmax(loaded.module(x).float(), dim=1)[0].numpy()
    return probs[:, halo : halo + height, halo : halo + width], valid


def tiled(
    scene: Path, checkpoint: Path, tmp_path: Path, *, tile: int, halo: int, blend: str
) -> tuple[np.ndarray, np.ndarray]:
    """Run ingest -> infer (in-process) -> stitch; return the store's mask and probabilities/254."""
    info = describe_scene(str(scene))
    store = ws.WorkStore(str(tmp_path / "store.zarr"))
    ingest(info, store, chunk_size=tile)
    grid = TileGrid(info.width, info.height, tile, halo)
    loaded = load_model(checkpoint)
    recipe = Recipe(
        model=loaded.identity, tile_size=tile, halo=halo, blend=blend, batch_size=4, probabilities=True,
        selection=Selection(), scaling=None,
    )
    classes = len(loaded.metadata.classes)
    run_inference(store, grid, recipe, ModelSpec(str(checkpoint), None, "cpu", 2), classes=classes, executor="local")
    if blend != "crop":
        stitch(store, grid, blend)  # type: ignore[arg-type]
    mask = np.asarray(store.array(ws.MASK)[...])
    probabilities = np.asarray(store.array(ws.PROBABILITIES)[...]).astype(np.float32) / ws.PROBABILITY_SCALE
    return mask, probabilities


@pytest.fixture(scope="module")
def bounded_model(make_checkpoint) -> tuple[Path, int]:  # type: ignore[no-untyped-def]
    """A plain U-Net (bounded receptive field) and a halo that covers its receptive-field radius."""
    path = make_checkpoint(
        "bounded", bands=("r", "g", "b"), mean=(80.0,) * 3, std=(40.0,) * 3, classes=4, depth=2
    )
    radius = receptive_field_radius(load_model(path).module)
    halo = -(-radius // 4) * 4
    return path, halo


@pytest.fixture(scope="module")
def half_resolution_model(make_checkpoint) -> tuple[Path, int]:  # type: ignore[no-untyped-def]
    """A plain U-Net that works at half resolution (downsample 2), and a halo covering its receptive field."""
    path = make_checkpoint(
        "half", bands=("r", "g", "b"), mean=(80.0,) * 3, std=(40.0,) * 3, classes=4, depth=2, downsample=2
    )
    module = load_model(path).module
    radius, multiple = receptive_field_radius(module), module.size_multiple
    return path, -(-radius // multiple) * multiple


@pytest.mark.parametrize("model", ["bounded_model", "half_resolution_model"])
def test_crop_with_halo_covering_the_receptive_field_equals_whole_image(
    model: str, data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    checkpoint, halo = request.getfixturevalue(model)
    scene = data_dir / "RGB.byte.tif"
    reference, valid = whole_image_probabilities(scene, checkpoint, halo)
    mask, probabilities = tiled(scene, checkpoint, tmp_path, tile=2 * halo, halo=halo, blend="crop")
    expected = np.where(valid > 0, np.argmax(reference, axis=0), ws.MASK_NODATA)
    assert mask.shape == expected.shape
    differ = mask != expected
    # float32 sums in another order may flip a near-exact tie between two classes; nothing else may differ
    top2 = np.sort(reference, axis=0)[-2:]
    margin = top2[1] - top2[0]
    assert not (differ & (margin > 1e-5)).any(), f"{int(differ.sum())} pixels differ beyond float near-ties"
    assert differ.sum() <= 1e-5 * differ.size
    ok = valid > 0
    assert np.abs(probabilities[:, ok] - reference[:, ok]).max() <= 0.5 / ws.PROBABILITY_SCALE + 1e-6


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
def test_blended_probabilities_stay_close_to_whole_image(
    bounded_model: tuple[Path, int], data_dir: Path, tmp_path: Path, blend: str
) -> None:
    """Stated tolerance: mean absolute probability error < 0.005, max < 0.1, mask agreement >= 99.5 %."""
    checkpoint, halo = bounded_model
    scene = data_dir / "RGB.byte.tif"
    reference, valid = whole_image_probabilities(scene, checkpoint, halo)
    mask, probabilities = tiled(scene, checkpoint, tmp_path, tile=2 * halo, halo=halo, blend=blend)
    ok = valid > 0
    error = np.abs(probabilities[:, ok] - reference[:, ok])
    agreement = (mask[ok] == np.argmax(reference, axis=0)[ok]).mean()
    print(f"{blend}: mean |dp| {error.mean():.5f}, max {error.max():.4f}, agreement {agreement:.5f}")
    assert error.mean() < 0.005
    assert error.max() < 0.1
    assert agreement >= 0.995
    assert (mask[~ok] == ws.MASK_NODATA).all()
