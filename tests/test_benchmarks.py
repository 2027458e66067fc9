"""Smoke tests of the benchmark's pure helpers (scene builder, RSS sampler, table), so the benchmark cannot rot.

No timings are asserted: benchmarks are not timed tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from benchmarks import bench_pipeline as bench

SOURCE = Path(__file__).resolve().parent / "data" / "lausanne-1091-322_00.tif"


def test_scene_side() -> None:
    assert [bench.scene_side(mp) for mp in (16, 64, 256, 1024)] == [4096, 8192, 16384, 32768]
    assert bench.scene_side(0.001) == 32  # rounded to a multiple of 16
    with pytest.raises(ValueError):
        bench.scene_side(0)


def test_mirror_indices_are_numpy_symmetric_padding() -> None:
    size = 5
    expected = np.pad(np.arange(size), (0, 3 * size), mode="symmetric")
    assert np.array_equal(bench.mirror_indices(0, 4 * size, size), expected)
    assert np.array_equal(bench.mirror_indices(7, 6, size), expected[7:13])


def test_build_scene_mirror_tiles_window_by_window_and_keeps_the_georeference(tmp_path: Path) -> None:
    side = 160  # windows of 48 px below: several windows per row and column, clipped at the edge
    path, reused = bench.build_scene(SOURCE, side, tmp_path, window=48, block=32)
    assert not reused
    with rasterio.open(SOURCE) as src, rasterio.open(path) as out:
        assert (out.width, out.height, out.count) == (side, side, src.count)
        assert out.crs == src.crs
        assert out.transform == src.transform  # same origin and resolution
        assert out.profile["tiled"] and out.compression is not None
        source = src.read()
        rows = bench.mirror_indices(0, side, src.height)
        cols = bench.mirror_indices(0, side, src.width)
        assert np.array_equal(out.read(), source[:, rows[:, None], cols[None, :]])
    again, reused = bench.build_scene(SOURCE, side, tmp_path, window=48, block=32)
    assert again == path and reused
    spec = json.loads(path.with_name(path.name + ".json").read_text())
    assert spec["side"] == side and len(spec["source_sha256"]) == 64
    assert not list(tmp_path.glob(".*partial"))


def test_rss_sampler_sees_descendants() -> None:
    # the child touches 200 MiB and waits; the sampler must see it through the process tree
    code = "import time; b = b'x' * (200 << 20); time.sleep(1.0)"
    measured = bench.run_measured([sys.executable, "-c", code])
    assert measured.returncode == 0
    assert measured.peak_bytes > 200 * 2**20
    assert 200 * 2**20 < measured.peak_pss_bytes <= measured.peak_bytes  # private pages count fully in PSS
    assert measured.seconds >= 1.0
    sampler = bench.TreeMemorySampler(interval=0.05)
    with sampler:
        pass
    assert sampler.sample() > 0 and sampler.peak_bytes > 0


def test_format_table_and_crop() -> None:
    rows = [
        {"megapixels": 16.78, "method": "segpipe", "seconds": 100.0, "mp_per_s": 0.1678,
         "ratio_to_limit": 0.61, "ratio_to_floor": 0.5, "overhead": {"overhead_s_per_mp": 0.0123},
         "peak_rss_gib": 2.5, "peak_pss_gib": 1.25, "disagreement": 0.0012, "notes": "x"},
        {"megapixels": 16.78, "method": "MONAI sliding window", "seconds": None, "notes": "skipped"},
    ]  # fmt: skip
    table = bench.format_table(rows).splitlines()
    assert table[0].startswith("| scene MP | method | wall s | MP/s | x limit | x I/O floor | overhead s/MP | peak RSS")
    assert len(table) == 4
    assert table[2] == "| 16.8 | segpipe | 100.0 | 0.168 | 0.61 | 0.50 | 0.012 | 2.50 | 1.25 | 0.12 | x |"
    assert "–" in table[3] and "skipped" in table[3]
    assert bench.crop_window(4096, 4096) == (1024, 1024, 2048)
    row, col, side = bench.crop_window(1000, 700)
    assert side == 688 and row >= 0 and row + side <= 700 and col + side <= 1000


def test_overhead_is_infer_minus_compute_per_megapixel_and_tile() -> None:
    summary = {
        "seconds": {"infer": 10.0},
        "segmenter_seconds": {"compute": 6.0},
        "scene": {"width": 2000, "height": 1000},
        "tiles": {"computed": 8},
    }
    assert bench.overhead(summary) == {
        "infer_s": 10.0, "compute_s": 6.0, "overhead_s": 4.0, "overhead_s_per_mp": 2.0, "overhead_s_per_tile": 0.5
    }


def test_seam_study_finds_crop_exact_when_the_halo_covers_the_receptive_field(
    make_checkpoint, data_dir: Path, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    import torch

    from benchmarks import bench_seams
    from segpipe.models.checkpoint import load_model, save_checkpoint
    from segpipe.models.networks import receptive_field_radius

    fixture = load_model(
        make_checkpoint("seams", bands=("r", "g", "b"), mean=(80.0,) * 3, std=(40.0,) * 3, classes=4, depth=2)
    )
    with torch.no_grad():  # an untrained net predicts one class everywhere; larger weights make classes vary
        for p in fixture.module.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    model = save_checkpoint(fixture.module, fixture.metadata, tmp_path / "varied.safetensors")
    halo = -(-receptive_field_radius(fixture.module) // 4) * 4
    out = tmp_path / "seams.json"
    argv = ["--scene", str(data_dir / "lausanne-1091-322_00.tif"), "--side", "256", "--model", str(model),
            "--configs", f"64:{halo},64:0", "--margin", str(halo), "--threads", "1", "--out", str(out)]  # fmt: skip
    assert bench_seams.main(argv) == 0
    rows = {(r["tile_size"], r["halo"], r["blend"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(64, halo, "crop"), (64, halo, "cosine"), (64, 0, "crop")}
    # a plain U-Net with halo >= its receptive field: tiles equal whole-image inference away from the scene edge
    assert rows[(64, halo, "crop")]["disagreement_interior"] == 0.0
    assert rows[(64, halo, "crop")]["compute_factor"] == ((64 + 2 * halo) / 64) ** 2
    # no halo: tile edges see zero padding where whole-image inference sees neighbours
    assert rows[(64, 0, "crop")]["disagreement_interior"] > 0.0


def test_seam_study_scene_is_the_benchmark_mirror_tiling(data_dir: Path) -> None:
    from benchmarks import bench_seams

    with rasterio.open(data_dir / "RGB.byte.tif") as src:
        source = src.read()
    scene = bench_seams.mirrored(data_dir / "RGB.byte.tif", 1600)
    h, w = source.shape[1:]
    assert scene.shape == (3, 1600, 1600)
    assert np.array_equal(scene[:, :h, :w], source)
    assert np.array_equal(scene[:, h : 2 * h, :w], source[:, ::-1, :])  # reflected, edge row repeated


def test_recipe_variants_are_valid_training_configs(tmp_path: Path) -> None:
    """Every screening variant names real TrainConfig fields and architecture arguments (validated on build)."""
    import dataclasses
    import shutil

    from benchmarks import bench_recipes
    from segpipe.models.registry import build_model
    from segpipe.models.train_default import ARGUMENTS, build_config

    data_dir = Path(__file__).resolve().parent / "data" / "dubai"
    for name in ("tile-1", "tile-2"):
        for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
            (tmp_path / name / kind).mkdir(parents=True)
            shutil.copy(data_dir / f"image_part_005{suffix}", tmp_path / name / kind)
    assert set(bench_recipes.DESCRIPTIONS) == set(bench_recipes.VARIANTS)
    for architecture, overrides, arguments in bench_recipes.VARIANTS.values():
        config = build_config(
            architecture, data=tmp_path, work_dir=tmp_path / "w", resume=True, num_threads=1, device="cpu",
            progress=False,
        )
        config = dataclasses.replace(config, arguments={**ARGUMENTS, **arguments}, **overrides)
        model = build_model(config.architecture, config.arguments)
        assert config.tile_size % model.size_multiple == 0
    row = {
        "variant": "base", "description": "d", "best_miou": 0.5, "best_epoch": 3, "mean_miou_from_epoch_4": None,
        "best_iou": {"building": 0.1, "land": 0.2, "road": None, "vegetation": 0.4, "water": 0.5},
    }
    assert bench_recipes.table([row]).splitlines()[-1] == (
        "| base | d | 0.500 (3) | - | 0.100 | 0.200 | 0.000 | 0.400 | 0.500 |"
    )
    assert bench_recipes.main(["--variants", "nope"]) == 2


def test_recipe_oracle_takes_each_class_best_over_all_epochs() -> None:
    """The oracle mean combines each class's best epoch across runs; missing or None scores count as nothing."""
    from benchmarks.bench_recipes import oracle

    run_a = [
        {"val_iou": {"building": 0.2, "land": 0.8, "road": None, "vegetation": 0.1, "water": 0.9, "unlabeled": 1.0}},
        {"val_iou": {"building": 0.4, "land": 0.7, "road": 0.1, "vegetation": 0.0, "water": 0.5}},
    ]
    run_b = [{"val_iou": {"road": 0.3, "vegetation": 0.2}}, {"val_iou": {}}]
    result = oracle([run_a, run_b])
    assert result["per_class_iou"] == {"building": 0.4, "land": 0.8, "road": 0.3, "vegetation": 0.2, "water": 0.9}
    assert abs(result["miou"] - 0.52) < 1e-12
    assert result["epochs"] == 3
    assert oracle([])["miou"] == 0.0


def test_train_step_table_compares_with_neither_setting_at_the_same_precision() -> None:
    from benchmarks import bench_train_step

    def row(precision: str, malloc: bool, channels_last: bool, median: float) -> dict[str, object]:
        return {
            "architecture": "unet", "precision": precision, "malloc": malloc, "channels_last": channels_last,
            "median_s": median,
        }

    rows = [row("fp32", False, False, 4.0), row("fp32", True, True, 2.0), row("bf16", False, False, 1.0),
            row("bf16", True, True, 0.8)]
    lines = bench_train_step.table(rows).splitlines()
    assert lines[3] == "| unet | fp32 | yes | yes | 2.00 | 2.00x |"
    assert lines[5] == "| unet | bf16 | yes | yes | 0.80 | 1.25x |"
    assert bench_train_step.main(["--steps", "0"]) == 2
    assert bench_train_step.main(["--architectures", "nope"]) == 2


def test_check_identical_records_every_case_and_detects_a_changed_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorded hashes cover every case, and a case whose output differs from its record fails the check."""
    from benchmarks import check_identical as check

    references = json.loads(check.RESULTS.read_text())["references"]
    assert references, "at least one CPU's reference"
    for reference in references.values():
        recorded = reference["cases"]
        assert set(recorded) == {case.name for case in check.CASES}
        assert all(len(digest) == 64 for case in recorded.values() for digest in case["sha256"].values())

    case = check.CASES[0]
    results = tmp_path / "identical.json"
    monkeypatch.setattr(check, "cpu_model", lambda: "Test CPU")
    other = {"references": {"Other CPU": {"cases": {case.name: {"sha256": {"mask": "0" * 64}}}}}}
    results.write_text(json.dumps(other))
    monkeypatch.setattr(check, "run_case", lambda case, scratch: {"sha256": {"mask": "0" * 64}, "seconds": 0.0})
    assert check.main(["--cases", case.name, "--results", str(results), "--scratch", str(tmp_path)]) == 1, (
        "another CPU's reference is no reference"
    )
    results.write_text(json.dumps({"references": {"Test CPU": other["references"]["Other CPU"]}}))
    monkeypatch.setattr(check, "run_case", lambda case, scratch: {"sha256": {"mask": "1" * 64}, "seconds": 0.0})
    assert check.main(["--cases", case.name, "--results", str(results), "--scratch", str(tmp_path)]) == 1
    monkeypatch.setattr(check, "run_case", lambda case, scratch: {"sha256": {"mask": "0" * 64}, "seconds": 0.0})
    assert check.main(["--cases", case.name, "--results", str(results), "--scratch", str(tmp_path)]) == 0
