"""Tests of benchmarks/bench_ablation.py: the variants, the split, the scores, the table, the paired bootstrap test
and the resume bookkeeping, on synthetic numbers (no training, except the one test marked slow)."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import bench_ablation as ab


def _history(scores: list[float]) -> list[dict[str, Any]]:
    return [
        {"epoch": i + 1, "val_miou": s, "val_iou": {c: s for c in ("building", "land", "road", "vegetation", "water")}}
        for i, s in enumerate(scores)
    ]


def _run(variant: str, area: str, seed: int, settled: float, best: float | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "held_out": area,
        "seed": seed,
        "settled_miou": settled,
        "best_miou": settled + 0.05 if best is None else best,
        "epochs": 12,
        "steps_per_epoch": 30,
        **extra,
    }


# ------------------------------------------------------------------------------------------------------ variants


def test_each_variant_switches_on_exactly_its_mechanism() -> None:
    from segpipe.models.attention import CBAM, AttentionGate, SelfAttention2d, SqueezeExcitation, WindowSelfAttention2d
    from segpipe.models.attention.spatial import SpatialAttention
    from segpipe.models.registry import attention_unet, build_model

    expected = {
        "plain": set(),
        "se": {"SqueezeExcitation"},
        "cbam": {"CBAM", "ChannelAttention", "SpatialAttention"},  # CBAM is channel + spatial
        "gates": {"AttentionGate"},
        "global": {"SelfAttention2d"},
        "local": {"WindowSelfAttention2d"},
        "full": {"CBAM", "ChannelAttention", "SpatialAttention", "WindowSelfAttention2d", "AttentionGate"},
    }
    kinds = (CBAM, AttentionGate, SelfAttention2d, SqueezeExcitation, WindowSelfAttention2d, SpatialAttention)
    assert list(ab.VARIANTS) == list(expected)
    for variant, mechanisms in expected.items():
        architecture, arguments = ab.variant_arguments(variant)
        model = build_model(architecture, arguments)
        found = {type(m).__name__ for m in model.modules() if isinstance(m, kinds)}
        assert found == mechanisms, variant
        assert (arguments["base_channels"], arguments["depth"]) == (16, 4)
    # "full" is today's shipped configuration: the registry's defaults
    defaults = {
        name: p.default
        for name, p in inspect.signature(attention_unet).parameters.items()
        if name in ("channel_attention", "self_attention", "attention_gates")
    }
    assert ab.VARIANTS["full"] == ("attention_unet", defaults)


def test_split_for_never_trains_on_tile_1(tmp_path: Path) -> None:
    for i in range(1, 8):
        (tmp_path / f"tile-{i}" / "images").mkdir(parents=True)
    train, val = ab.split_for(tmp_path, "tile-2")
    assert [p.name for p in train] == ["tile-3", "tile-4", "tile-5", "tile-6", "tile-7"]
    assert [p.name for p in val] == ["tile-2"]
    train, val = ab.split_for(tmp_path, "tile-1")
    assert [p.name for p in train] == [f"tile-{i}" for i in range(2, 8)]
    assert [p.name for p in val] == ["tile-1"]


def test_measure_forward_reports_parameters_and_seconds_per_megapixel() -> None:
    out = ab.measure_forward("plain", 1, size=64, repeats=1)
    assert out["parameters"] > 1_000_000 and out["forward_seconds_per_megapixel"] > 0
    assert (out["forward_size"], out["forward_threads"]) == (64, 1)


# -------------------------------------------------------------------------------------------------------- scores


def test_settled_and_best_scores() -> None:
    history = _history([0.1, 0.5, 0.2, 0.3, 0.4, 0.5, 0.6])
    assert ab.settled_score(history) == pytest.approx((0.2 + 0.3 + 0.4 + 0.5 + 0.6) / 5)
    assert ab.best_score(history) == (7, 0.6)
    assert ab.best_score(history[:6]) == (2, 0.5)  # the earliest of tied epochs, as the training loop keeps it
    assert ab.settled_score(history[:4]) is None
    assert ab.best_score([]) is None
    per_class = ab.settled_class_scores(history)
    assert per_class["road"] == pytest.approx(0.4)
    history[-1]["val_iou"]["water"] = None
    assert ab.settled_class_scores(history)["water"] is None


def test_summary_and_table_mean_and_sample_std() -> None:
    runs = [
        _run("plain", "tile-1", 1, 0.40, parameters=1_964_182, forward_seconds_per_megapixel=0.3),
        _run("plain", "tile-1", 2, 0.50),
        _run("plain", "tile-1", 3, 0.60),
        _run("plain", "tile-2", 1, 0.30),
        _run("se", "tile-1", 1, 0.45),
    ]
    rows = ab.summary(runs)
    assert [r["variant"] for r in rows] == ["plain", "se"]
    plain = rows[0]["areas"]
    assert plain["tile-1"]["n"] == 3
    assert plain["tile-1"]["settled"] == pytest.approx([0.5, 0.1])
    assert plain["tile-1"]["best"] == pytest.approx([0.55, 0.1])
    assert plain["tile-2"]["settled"][1] is None  # one run: no std
    assert plain["pooled"]["settled"] == pytest.approx([0.45, math.sqrt(((0.05**2) * 2 + 0.15**2 + 0.15**2) / 3)])
    assert "tile-2" not in rows[1]["areas"]
    lines = ab.format_table(rows).splitlines()
    assert lines[0].startswith("| variant | params | forward s/MP | tile-1 best | tile-1 settled | tile-2 best")
    assert len(lines) == 4
    assert lines[2].startswith("| plain: plain U-Net | 1.96 M | 0.30 | 0.550 ± 0.100 (3) | 0.500 ± 0.100 (3) |")
    assert "0.300 ± – (1)" in lines[2]
    assert lines[3].endswith("| – | – | 0.500 ± – (1) | 0.450 ± – (1) |")


# ---------------------------------------------------------------------------------------------- pairing, bootstrap


def test_pairs_match_seed_and_area_and_skip_unpaired_runs() -> None:
    runs = [
        _run("plain", "tile-1", 1, 0.40),
        _run("plain", "tile-1", 2, 0.50),
        _run("plain", "tile-2", 1, 0.30),
        _run("cbam", "tile-2", 1, 0.35),
        _run("cbam", "tile-1", 2, 0.45),
        _run("cbam", "tile-1", 3, 0.90),  # no plain run of seed 3: unpaired
    ]
    pairs = ab.paired_differences(runs, "cbam", "plain")
    assert [(a, s) for a, s, _ in pairs] == [("tile-1", 2), ("tile-2", 1)]
    assert [d for _, _, d in pairs] == pytest.approx([-0.05, 0.05])


def test_bootstrap_interval_of_two_values_and_of_a_constant() -> None:
    # the mean of a resample of [0, 1] is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: the 95 % interval is [0, 1]
    assert ab.bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)
    # of [0, 0, 1]: 0, 1/3, 2/3, 1 with probabilities 8, 12, 6, 1 in 27; 1/27 = 3.7 % lies above the 97.5 % point
    assert ab.bootstrap_interval([0.0, 0.0, 1.0]) == (0.0, 1.0)
    assert ab.bootstrap_interval([0.0, 0.0, 1.0], level=0.8) == pytest.approx((0.0, 2 / 3))
    assert ab.bootstrap_interval([0.02] * 6) == pytest.approx((0.02, 0.02))
    low, high = ab.bootstrap_interval([0.01, 0.03, -0.02, 0.05, 0.00, 0.02])
    assert low < sum([0.01, 0.03, -0.02, 0.05, 0.00, 0.02]) / 6 < high
    assert (low, high) == ab.bootstrap_interval([0.01, 0.03, -0.02, 0.05, 0.00, 0.02])  # deterministic
    with pytest.raises(ValueError):
        ab.bootstrap_interval([])


def test_seed_spread_is_pooled_within_areas() -> None:
    runs = [_run("plain", "tile-1", s, v) for s, v in ((1, 0.4), (2, 0.5), (3, 0.6))]
    runs += [_run("plain", "tile-2", s, 0.1) for s in (1, 2, 3)]  # far from tile-1, but no spread over seeds
    assert ab.seed_spread(runs) == pytest.approx(math.sqrt((0.01 + 0.0) / 2))
    assert ab.seed_spread(runs[:1]) is None


def test_paired_test_verdicts() -> None:
    plain = [(a, s, v) for a, base in (("tile-1", 0.45), ("tile-2", 0.35)) for s, v in ((1, base), (2, base + 0.02),
             (3, base - 0.02))]  # fmt: skip
    runs = [_run("plain", a, s, v) for a, s, v in plain]
    runs += [_run("cbam", a, s, v + 0.05) for a, s, v in plain]  # +0.05 on every pair
    runs += [_run("se", a, s, v + d) for (a, s, v), d in zip(plain, (0.03, -0.02, 0.01, -0.03, 0.02, 0.0), strict=True)]
    cbam = ab.paired_test(runs, "cbam")
    assert cbam["n"] == 6 and cbam["mean_difference"] == pytest.approx(0.05)
    assert cbam["seed_spread"] == pytest.approx(0.02)
    assert cbam["exceeds_seed_spread"] is True and cbam["interval_excludes_zero"] is True
    se = ab.paired_test(runs, "se")
    assert se["mean_difference"] == pytest.approx(0.01 / 6)
    assert se["exceeds_seed_spread"] is False and se["interval_excludes_zero"] is False
    assert se["interval_95"][0] < 0 < se["interval_95"][1]
    none = ab.paired_test(runs, "gates")
    assert none["n"] == 0 and none["mean_difference"] is None
    tests = ab.all_tests(runs)
    assert [(t["variant"], t["reference"]) for t in tests] == [("se", "plain"), ("cbam", "plain")]
    text = ab.format_tests(tests)
    assert "| cbam | plain | 6 | +0.050 | [+0.050, +0.050] | 0.020 | yes | yes |" in text


# ------------------------------------------------------------------------------------------------ resume bookkeeping


def test_plan_order_pending_and_merge() -> None:
    planned = ab.plan(["plain", "se"], ["tile-1", "tile-2"], [7, 8], 12, 30)
    assert [s.key for s in planned[:4]] == [
        ("plain", "tile-1", 7),
        ("se", "tile-1", 7),
        ("plain", "tile-2", 7),
        ("se", "tile-2", 7),
    ]
    assert len(planned) == 8 and planned[0].work_dir(Path("w")) == Path("w/plain/tile-1/seed-7")
    recorded = [_run("se", "tile-1", 7, 0.4), _run("plain", "tile-2", 8, 0.3)]
    assert [s.key for s in ab.pending(planned, recorded)] == [
        ("plain", "tile-1", 7),
        ("plain", "tile-2", 7),
        ("se", "tile-2", 7),
        ("plain", "tile-1", 8),
        ("se", "tile-1", 8),
        ("se", "tile-2", 8),
    ]
    merged = ab.merge_run(recorded, _run("se", "tile-1", 7, 0.5))
    assert len(merged) == 2 and merged[0]["variant"] == "plain"  # VARIANTS order
    assert next(r for r in merged if r["variant"] == "se")["settled_miou"] == 0.5
    assert ab.schedule_conflicts({"runs": recorded}, 12, 30) == []
    assert ab.schedule_conflicts({"runs": recorded}, 10, 30) == [
        "se/tile-1/seed 7: 12 x 30",
        "plain/tile-2/seed 8: 12 x 30",
    ]


def test_main_reads_back_recorded_runs_without_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, work = tmp_path / "ablation.json", tmp_path / "work"
    runs = [_run(v, a, s, 0.4 + 0.01 * s) for v in ("plain", "full") for a in ("tile-1", "tile-2") for s in (1, 2)]
    forward = {v: {"parameters": 1, "forward_seconds_per_megapixel": 0.5} for v in ("plain", "full")}
    out.write_text(json.dumps({"runs": runs, "forward": forward}))
    argv = ["--variants", "plain,full", "--seeds", "2", "--first-seed", "1", "--out", str(out), "--work-dir", str(work)]
    argv += ["--data", str(tmp_path / "no-data")]  # a run started by mistake fails at once instead of training
    assert ab.main(argv) == 0
    assert not work.exists()  # nothing trained
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 8 and report["schedule"]["epochs"] == ab.DEFAULT_EPOCHS
    assert report["summary"][0]["variant"] == "plain" and "| full: " in report["table_markdown"]
    assert {(t["variant"], t["reference"]) for t in report["tests"]} == {("full", "plain"), ("plain", "full")}
    printed = capsys.readouterr().out
    assert "0 runs to train" in printed and "full vs plain: +0.000 over 4 pairs" in printed
    # another schedule in the same file is refused, not mixed in
    assert ab.main([*argv, "--epochs", "8"]) == 2
    assert ab.main(["--report", "--out", str(out)]) == 0


@pytest.mark.slow
@pytest.mark.shared
def test_train_run_records_and_reads_back_a_real_run(shared_data: Path, tmp_path: Path) -> None:
    spec = ab.RunSpec("plain", "tile-2", 0, epochs=5, steps_per_epoch=1)
    data = str(shared_data / "dubai-aerial")
    record = ab.train_run(spec, 1, str(tmp_path), data)
    assert record["train_tiles"] == ["tile-3", "tile-4", "tile-5", "tile-6", "tile-7"]
    assert [h["epoch"] for h in record["history"]] == [1, 2, 3, 4, 5]
    assert record["settled_miou"] == pytest.approx(sum(h["val_miou"] for h in record["history"]) / 5)
    again = ab.train_run(spec, 1, str(tmp_path), data)  # finished: read back from the work folder
    assert again["history"] == record["history"] and again["wall_seconds"] == record["wall_seconds"]
