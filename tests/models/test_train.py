"""Tests for segpipe.models.training: a short real training run, checkpoint contents, resume, configuration errors."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import torch
from rasterio.errors import NotGeoreferencedWarning
from safetensors.torch import load_file

from segpipe.core.colours import ColourTable
from segpipe.core.errors import ConfigError
from segpipe.models.data import read_image, read_mask
from segpipe.models.dubai import DUBAI_CLASSES
from segpipe.models.training import EpochRecord, TrainConfig, WarmupCosine, predict_image, train

TESTS_DATA = Path(__file__).resolve().parents[1] / "data" / "dubai"
TABLE = ColourTable.from_hex(c for _, c in DUBAI_CLASSES)
TINY = {"in_channels": 3, "num_classes": 6, "base_channels": 4, "depth": 2, "heads": 2, "window": 4}


@pytest.fixture(autouse=True)
def _quiet_georef() -> None:
    warnings.simplefilter("ignore", NotGeoreferencedWarning)


def _write(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore", NotGeoreferencedWarning)
    with rasterio.open(
        path, "w", driver="PNG", width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype="uint8"
    ) as dst:
        dst.write(data)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two training pairs (the top quarters of the real Dubai test pair) and one validation pair (its bottom
    half), with RGB colour-coded masks."""
    root = tmp_path_factory.mktemp("dubai")
    image = read_image(TESTS_DATA / "image_part_005.jpg")
    ids = read_mask(TESTS_DATA / "image_part_005.png", colour_table=TABLE)
    rgb = np.array(TABLE.colours, dtype=np.uint8)[ids].transpose(2, 0, 1)
    h, w = ids.shape
    crops = {
        ("train", "left"): (slice(0, h // 2), slice(0, w // 2)),
        ("train", "right"): (slice(0, h // 2), slice(w // 2, w)),
        ("val", "bottom"): (slice(h // 2, h), slice(0, w)),
    }
    for (split, name), (ys, xs) in crops.items():
        _write(root / split / "images" / f"{name}.png", np.ascontiguousarray(image[:, ys, xs]))
        _write(root / split / "masks" / f"{name}.png", np.ascontiguousarray(rgb[:, ys, xs]))
    return root / "train", root / "val"


def config(folders: tuple[Path, Path], out: Path, **overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "train_dirs": (folders[0],),
        "val_dirs": (folders[1],),
        "out_dir": out,
        "arguments": TINY,
        "epochs": 3,
        "steps_per_epoch": 6,
        "batch_size": 4,
        "tile_size": 64,
        "lr": 1e-2,
        "warmup_steps": 2,
        "ignore_classes": (5,),
        "seed": 7,
        "device": "cpu",
        "precision": "fp32",
        "num_threads": 1,
        "halo": 8,
        "inference_tile_size": 128,
        "val_tile_size": 160,
        "progress": False,
    }
    fields.update(overrides)
    return TrainConfig(**fields)


def test_short_run_learns_and_writes_a_loadable_checkpoint(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from segpipe.models.checkpoint import load_model

    result = train(config(folders, tmp_path / "run"))
    losses = [r.train_loss for r in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.best_epoch in (1, 2, 3)
    assert result.best_miou is not None and 0 <= result.best_miou <= 1
    assert set(result.per_class_iou) <= {"building", "land", "road", "vegetation", "water"}

    loaded = load_model(result.checkpoint)
    meta = loaded.metadata
    assert meta.architecture == "attention_unet" and dict(meta.arguments) == TINY
    assert [(c.name, c.colour) for c in meta.classes] == [(n, c.upper()) for n, c in DUBAI_CLASSES]
    assert tuple(meta.bands) == ("red", "green", "blue") and len(meta.mean) == 3 and min(meta.std) > 0
    assert (meta.tile_size, meta.halo, meta.size_multiple) == (128, 8, 4)
    prov = meta.provenance
    assert prov["data"] == [str(folders[0])] and prov["validation_data"] == [str(folders[1])]
    assert prov["trained"] is True and prov["seed"] == 7 and prov["epochs"] == result.best_epoch
    assert prov["val_miou"] == pytest.approx(result.best_miou)
    assert prov["val_iou"] == pytest.approx(result.per_class_iou)
    assert prov["torch_version"] == torch.__version__ and prov["train_seconds"] > 0
    x = torch.zeros(1, 3, 32, 32)
    assert loaded.module(x).shape == (1, 6, 32, 32)

    # the resume state is safetensors + JSON only
    state = load_file(str(result.state))
    assert any(k.startswith("optimizer.") for k in state) and "rng.torch" in state
    info = json.loads((result.state.parent / "last.json").read_text())
    assert info["epoch"] == 3 and len(info["history"]) == 3
    assert sorted(p.name for p in result.state.parent.iterdir()) == ["last.json", "last.safetensors"]


class Interrupt(Exception):
    pass


def test_resume_reaches_the_uninterrupted_result(folders: tuple[Path, Path], tmp_path: Path) -> None:
    whole = train(config(folders, tmp_path / "whole"))

    def stop_after_first(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise Interrupt

    interrupted = config(folders, tmp_path / "parts")
    with pytest.raises(Interrupt):
        train(interrupted, on_epoch_end=stop_after_first)
    with pytest.raises(ConfigError, match="resume=True"):
        train(interrupted)
    with pytest.raises(ConfigError, match="lr"):
        train(dataclasses.replace(interrupted, resume=True, lr=5e-3))
    resumed = train(dataclasses.replace(interrupted, resume=True))

    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert [r.train_loss for r in resumed.history] == [r.train_loss for r in whole.history]
    assert [r.val_miou for r in resumed.history] == [r.val_miou for r in whole.history]
    assert resumed.best_epoch == whole.best_epoch
    a, b = load_file(str(whole.state)), load_file(str(resumed.state))
    model_keys = [k for k in a if k.startswith("model.")]
    assert model_keys and all(torch.equal(a[k], b[k]) for k in model_keys)
    assert whole.checkpoint.read_bytes() == resumed.checkpoint.read_bytes()

    # resuming a finished run trains nothing and reports the same result
    again = train(dataclasses.replace(interrupted, resume=True))
    assert again.history == resumed.history and again.best_miou == resumed.best_miou


def test_predict_image_windows_cover_every_pixel(folders: tuple[Path, Path]) -> None:
    from segpipe.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("unet", {"in_channels": 3, "num_classes": 6, "base_channels": 4, "depth": 2}).eval()
    image = read_image(folders[1] / "images" / "bottom.png")[:, :150, :201]
    whole = predict_image(model, image, (128.0,) * 3, (64.0,) * 3, size_multiple=4, window=1024)
    tiled = predict_image(model, image, (128.0,) * 3, (64.0,) * 3, size_multiple=4, window=80, halo=20)
    assert whole.shape == tiled.shape == (150, 201)
    assert (whole == tiled).mean() > 0.99


def test_schedule_and_config_checks(folders: tuple[Path, Path], tmp_path: Path) -> None:
    schedule = WarmupCosine(warmup=2, total=10, min_ratio=0.1)
    assert [round(schedule(s), 3) for s in (0, 1, 2, 10)] == [0.5, 1.0, 1.0, 0.1]
    with pytest.raises(ConfigError, match=r"num_classes'\] == 6"):
        config(folders, tmp_path, arguments={**TINY, "num_classes": 4})
    with pytest.raises(ConfigError, match="fp16"):
        train(config(folders, tmp_path, precision="fp16"))
    with pytest.raises(ConfigError, match="validation folders apart"):
        config(folders, tmp_path, val_dirs=(folders[0],))
    with pytest.raises(ConfigError, match="ignore_index"):
        config(folders, tmp_path, ignore_index=3)
    with pytest.raises(ConfigError, match="class_weighting"):
        config(folders, tmp_path, class_weighting="log")
    with pytest.raises(ConfigError, match="multiple of 4"):
        train(config(folders, tmp_path / "odd", tile_size=30))
    with pytest.raises(ConfigError, match="dice_weight"):
        config(folders, tmp_path, dice_weight=-1.0)


def test_dice_term_joins_the_loss_and_the_provenance(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from segpipe.models.checkpoint import load_model

    one = {"epochs": 1, "steps_per_epoch": 1}
    plain = train(config(folders, tmp_path / "ce", **one))
    dice = train(config(folders, tmp_path / "dice", dice_weight=2.0, **one))
    # same seed, same first batch, same initial weights: the only difference is the added Dice term,
    # which an untrained network cannot drive near zero
    extra = dice.history[0].train_loss - plain.history[0].train_loss
    assert 2 * 0.3 < extra <= 2.0
    assert load_model(dice.checkpoint).metadata.provenance["dice_weight"] == 2.0
    assert load_model(plain.checkpoint).metadata.provenance["dice_weight"] == 0.0


def test_default_run_configuration(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from segpipe.models.train_default import ARGUMENTS, HYPERPARAMETERS, build_config

    root = tmp_path / "dubai-aerial"
    root.mkdir()
    for name, source in (("tile-1", folders[1]), ("tile-2", folders[0]), ("tile-3", folders[0])):
        (root / name).symlink_to(source, target_is_directory=True)
    cfg = build_config(
        "unet", data=root, work_dir=tmp_path / "w", resume=True, num_threads=1, device="cpu", progress=False
    )
    assert [p.name for p in cfg.val_dirs] == ["tile-1"]
    assert [p.name for p in cfg.train_dirs] == ["tile-2", "tile-3"]
    assert cfg.architecture == "unet" and dict(cfg.arguments) == ARGUMENTS
    assert cfg.ignore_classes == (5,) and cfg.unknown_colours == "ignore"
    assert {k: getattr(cfg, k) for k in HYPERPARAMETERS} == HYPERPARAMETERS


def test_fingerprint_changes_tolerate_fields_added_later(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from segpipe.models.training.config import fingerprint_changes as _fingerprint_changes

    current = config(folders, tmp_path).fingerprint()
    older = {k: v for k, v in current.items() if k != "colour_jitter"}  # written before the field existed
    assert _fingerprint_changes(older, current) == []
    assert _fingerprint_changes(older, {**current, "colour_jitter": 0.1}) == ["colour_jitter"]
    assert _fingerprint_changes({**current, "lr": 1.0}, current) == ["lr"]


def test_ema_update_follows_the_formula_with_warm_up() -> None:
    from segpipe.models.training import ema_update

    model, average = torch.nn.BatchNorm2d(2), torch.nn.BatchNorm2d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        average.weight.fill_(1.0)
    model.num_batches_tracked.fill_(5)
    ema_update(average, model, 0.99, step=0)  # warm-up: d = min(0.99, 1/10) = 0.1
    assert torch.allclose(average.weight, torch.full((2,), 0.1 * 1.0 + 0.9 * 3.0))
    assert int(average.num_batches_tracked) == 5  # integer buffers are copied
    before = average.weight.clone()
    ema_update(average, model, 0.99, step=10_000)  # d = 0.99
    assert torch.allclose(average.weight, 0.99 * before + 0.01 * 3.0)


def test_weight_average_is_validated_kept_and_resumed(folders: tuple[Path, Path], tmp_path: Path) -> None:
    from segpipe.models.checkpoint import load_model

    whole = train(config(folders, tmp_path / "whole", ema_decay=0.9))
    state = load_file(str(whole.state))
    ema_keys = [k for k in state if k.startswith("ema.")]
    assert ema_keys and len(ema_keys) == len([k for k in state if k.startswith("model.")])
    assert any(not torch.equal(state[k], state["model." + k[4:]]) for k in ema_keys)
    assert all(r.raw_val_miou is not None for r in whole.history)  # the trained weights are scored beside it
    assert load_model(whole.checkpoint).metadata.provenance["ema_decay"] == 0.9
    # the kept checkpoint holds the average's weights, not the trained ones (no validation: the last epoch's)
    last = train(config(folders, tmp_path / "noval", val_dirs=(), ema_decay=0.9, epochs=1, steps_per_epoch=3))
    kept, last_state = load_model(last.checkpoint).module.state_dict(), load_file(str(last.state))
    assert all(torch.equal(kept[k], last_state["ema." + k]) for k in kept)
    assert not all(torch.equal(kept[k], last_state["model." + k]) for k in kept)

    def stop_after_first(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise Interrupt

    interrupted = config(folders, tmp_path / "parts", ema_decay=0.9)
    with pytest.raises(Interrupt):
        train(interrupted, on_epoch_end=stop_after_first)
    with pytest.raises(ConfigError, match="ema_decay"):
        train(dataclasses.replace(interrupted, resume=True, ema_decay=0.0))
    resumed = train(dataclasses.replace(interrupted, resume=True))
    assert [r.val_miou for r in resumed.history] == [r.val_miou for r in whole.history]
    b = load_file(str(resumed.state))
    assert all(torch.equal(state[k], b[k]) for k in ema_keys)
    assert whole.checkpoint.read_bytes() == resumed.checkpoint.read_bytes()
    with pytest.raises(ConfigError, match="ema_decay"):
        config(folders, tmp_path / "bad", ema_decay=1.0)
