"""One recipe keys everything: the work store's results, every output key, what the segmenters make; planned with
pixels or decided without them, it is the same recipe; and every field of it counts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from segpipe.core.errors import ModelError
from segpipe.core.pixels import PixelMap
from segpipe.core.tiles import TileGrid
from segpipe.models.checkpoint import load_model
from segpipe.pipeline import store as ws
from segpipe.pipeline.incremental import decide, output_key
from segpipe.pipeline.infer import ModelSpec, TileSegmenter
from segpipe.pipeline.ingest import ingest
from segpipe.pipeline.plan import make_plan, scene_output_key
from segpipe.pipeline.read import describe_scene
from segpipe.pipeline.recipe import Recipe
from segpipe.pipeline.scene import Selection
from segpipe.pipeline.settings import RunSettings

BASE = Recipe(
    model="m" * 64,
    tile_size=256,
    halo=32,
    blend="crop",
    batch_size=4,
    probabilities=False,
    selection=Selection(),
    scaling=None,
)


def another(value: Any) -> Any:
    """A different value of the same kind (a new kind of field must be taught here, on purpose)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 8
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return "percentile:2,98"
    if isinstance(value, Selection):
        return Selection(bands=(3, 2, 1))
    raise AssertionError(f"a recipe field of a new kind: {value!r}; say how it changes in another()")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Recipe) if f.name != "pixel_map"])
def test_every_field_changes_the_digest_and_the_key_and_is_named(name: str) -> None:
    """A new pixel setting is one field of Recipe: this test then covers it, in the work store's key, the output
    key and the reason a data set gives for segmenting again."""
    changed = dataclasses.replace(BASE, **{name: another(getattr(BASE, name))})
    assert changed.digest() != BASE.digest()
    before, after = output_key(BASE, scene="s"), output_key(changed, scene="s")
    assert before.digest != after.digest
    recorded = {"key": before.to_dict()}
    reason = decide(after, recorded, outputs_exist=True, force=False).reason
    assert reason == ("changed model" if name == "model" else f"changed settings ({name})")


def test_the_pixel_map_is_not_keyed_the_scaling_is() -> None:
    """The pixel map is what the scaling gives for the scene's content: both are keyed already (scaling, scene)."""
    stretch = PixelMap((2.0,) * 3, (0.0,) * 3, (0.0, 1.0), "percentile")
    mapped = dataclasses.replace(BASE, scaling="percentile", pixel_map=stretch)
    assert mapped.digest() == dataclasses.replace(BASE, scaling="percentile").digest()
    assert mapped.digest() != BASE.digest()


def test_the_planned_key_is_the_key_decided_without_pixels(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    """make_plan (which computes the scene's pixel map) and scene_output_key (a data set
    deciding, reading headers only) build the same recipe."""
    scene = str(data_dir / "RGB.byte.tif")
    settings = RunSettings(
        input=scene, output=str(tmp_path / "m.tif"), model=str(rgb_checkpoint), scaling="linear:0.5,1", bands="1,2,3",
        nodata=0, tile_size=128, halo=16, probabilities=str(tmp_path / "p.tif"),
    )  # fmt: skip
    plan = make_plan(settings)
    assert plan.recipe.pixel_map is not None, "the pixel map was computed for the run"
    decided = scene_output_key(settings, describe_scene(scene), load_model(str(rgb_checkpoint)))
    assert decided == plan.output_key
    assert plan.recipe.selection == Selection(nodata=0.0)
    assert decided.settings["probabilities"] is True and decided.model == plan.model.identity


def test_the_work_store_keeps_results_only_for_the_same_recipe_of_the_same_scene(
    data_dir: Path, tmp_path: Path
) -> None:
    info = describe_scene(str(data_dir / "RGB.byte.tif"))
    store = ws.WorkStore(str(tmp_path / "s.zarr"))
    ingest(info, store, chunk_size=256)
    grid = TileGrid(info.width, info.height, 256, 32)

    def prepare(recipe: Recipe) -> bool:
        return store.prepare_run(recipe.digest(), grid, 6, probabilities=False, tile_probabilities=False)

    assert not prepare(BASE)
    store.array(ws.DONE)[0, 0] = 1
    assert prepare(BASE) and store.array(ws.DONE)[0, 0] == 1, "the same recipe: results kept"
    assert not prepare(dataclasses.replace(BASE, halo=16)) and store.array(ws.DONE)[0, 0] == 0
    prepare(BASE)
    store.array(ws.DONE)[0, 0] = 1
    store.set_attrs(scene={**store.attrs["scene"], "fingerprint": "another version of the scene"})
    assert not prepare(BASE) and store.array(ws.DONE)[0, 0] == 0, "the scene changed: results discarded"


def test_a_segmenter_makes_only_the_recipe_of_the_model_it_holds(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    info = describe_scene(str(data_dir / "RGB.byte.tif"))
    store = ws.WorkStore(str(tmp_path / "s.zarr"))
    ingest(info, store, chunk_size=64)
    loaded = load_model(str(rgb_checkpoint))
    recipe = dataclasses.replace(BASE, model=loaded.identity, tile_size=64, halo=16)
    store.prepare_run(recipe.digest(), TileGrid(info.width, info.height, 64, 16), 6, probabilities=False,
                      tile_probabilities=False)  # fmt: skip
    segmenter = TileSegmenter(ModelSpec(str(rgb_checkpoint), loaded.checksum, "cpu", 1))
    assert segmenter.process(store.url, recipe, [[0]])["tiles"] == 1
    with pytest.raises(ModelError, match="the model changed since the run was planned"):
        segmenter.process(store.url, dataclasses.replace(recipe, model="0" * 64), [[1]])
