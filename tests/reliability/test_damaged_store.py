"""A resume does not trust a done flag blindly: a tile whose result chunk is missing, truncated or corrupt fails its
checksum and is computed again, and the outputs are those of a clean run, byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from segpipe.cli import main

pytestmark = pytest.mark.timeout(600)


def _run(scene: Path, out: Path, work: Path, model: Path, *extra: str) -> dict:
    argv = ["run", str(scene), str(out), "--model", str(model), "--work-dir", str(work), "--executor", "local",
            "--no-prefect", "--overwrite", *extra]  # fmt: skip
    assert main(argv) == 0
    return json.loads(out.with_suffix(".summary.json").read_text())


def _chunks(store: Path, array: str) -> list[Path]:
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("blend", ["crop", "cosine"])
def test_damaged_result_chunks_are_computed_again(
    blend: str, data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scene, work = data_dir / "RGB.byte.tif", tmp_path / "work"
    extra = ["--blend", blend, "--probabilities", str(tmp_path / "p.tif")]
    clean = _run(scene, tmp_path / "m.tif", work, rgb_checkpoint, *extra)
    reference = {p: (tmp_path / p).read_bytes() for p in ("m.tif", "p.tif")}
    store = Path(clean["work_store"])
    results = "tile_probabilities" if blend != "crop" else "mask"
    chunks = _chunks(store, results)
    assert len(chunks) > 10
    chunks[3].unlink()  # missing: zarr would read the fill value, nodata
    chunks[5].write_bytes(chunks[5].read_bytes()[:20])  # truncated: does not decode
    data = bytearray(chunks[7].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte flipped: may decode, to other pixels
    chunks[7].write_bytes(bytes(data))
    if blend == "crop":
        _chunks(store, "probabilities")[9].unlink()
    resumed = _run(scene, tmp_path / "m.tif", work, rgb_checkpoint, *extra)
    expected = 4 if blend == "crop" else 3
    assert resumed["tiles"]["damaged"] == expected, resumed["tiles"]
    batch = resumed["tiles"]["batch_size"]  # a damaged tile's batch is computed again whole: the same numerics
    assert expected <= resumed["tiles"]["computed"] <= expected * batch < resumed["tiles"]["total"]
    assert {p: (tmp_path / p).read_bytes() for p in ("m.tif", "p.tif")} == reference


def test_an_intact_store_resumes_without_computing(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    scene, work = data_dir / "RGB.byte.tif", tmp_path / "work"
    _run(scene, tmp_path / "m.tif", work, rgb_checkpoint)
    again = _run(scene, tmp_path / "m.tif", work, rgb_checkpoint)
    assert again["tiles"]["damaged"] == 0 and again["tiles"]["computed"] == 0
