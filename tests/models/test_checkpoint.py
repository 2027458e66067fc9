"""Checkpoints: round trip, path resolution, weight/metadata mismatches, pickles refused unexecuted."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from segpipe.core.errors import ConfigError, ModelError
from segpipe.models.checkpoint import (
    LoadedModel,
    ModelMetadata,
    default_model_path,
    load_model,
    save_checkpoint,
    write_metadata,
)
from segpipe.models.networks import UNet
from segpipe.models.registry import build_model
from tests.models.conftest import TINY_ARGUMENTS, Evil, make_metadata, randomise


def _saved(tmp_path: Path, name: str = "model") -> tuple[torch.nn.Module, ModelMetadata, Path]:
    metadata = make_metadata()
    model = randomise(build_model(metadata.architecture, metadata.arguments))
    return model, metadata, save_checkpoint(model, metadata, tmp_path / name)


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model, metadata, weights = _saved(tmp_path)
    assert weights == tmp_path / "model.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(weights)
    assert isinstance(loaded, LoadedModel)
    assert loaded.metadata == metadata
    assert loaded.path == str(weights.resolve())
    assert loaded.checksum == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not loaded.module.training
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), model(x))


def test_saving_twice_gives_identical_bytes(tmp_path: Path) -> None:
    model, metadata, first = _saved(tmp_path / "a")
    second = save_checkpoint(model, metadata, tmp_path / "b" / "model.json")
    assert second == tmp_path / "b" / "model.safetensors"
    for suffix in (".safetensors", ".json"):
        assert first.with_suffix(suffix).read_bytes() == second.with_suffix(suffix).read_bytes()


def test_found_by_sidecar_and_directory(tmp_path: Path) -> None:
    _, _, weights = _saved(tmp_path)
    assert load_model(weights.with_suffix(".json")).path == str(weights.resolve())
    assert load_model(tmp_path).path == str(weights.resolve())
    assert load_model(str(tmp_path)).path == str(weights.resolve())
    _saved(tmp_path, "other")
    with pytest.raises(ModelError, match=r"holds 2 checkpoints .*; pass the one you mean"):
        load_model(tmp_path)


def test_default_model() -> None:
    loaded = load_model("default")
    assert Path(loaded.path) == default_model_path().resolve()
    assert load_model("default.json").checksum == loaded.checksum
    meta = loaded.metadata
    assert meta.architecture == "attention_unet" and meta.provenance["trained"] is True
    assert meta.provenance["val_miou"] > 0.4  # trained on the Dubai pairs (README: Model)
    assert [c.name for c in meta.classes] == ["building", "land", "road", "vegetation", "water", "unlabeled"]
    assert meta.classes[0].colour == "#3C1098" and meta.classes[-1].colour == "#9B9B9B"
    assert (meta.tile_size, meta.halo, meta.size_multiple) == (1024, 32, 16)
    assert meta.bands == ("red", "green", "blue")
    assert isinstance(loaded.module, UNet) and loaded.module.size_multiple == 16
    with torch.inference_mode():
        assert loaded.module(torch.zeros(1, 3, 32, 32)).shape == (1, 6, 32, 32)


def test_unknown_names_and_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no packaged model named 'nosuch' \(available: default, null\)"):
        load_model("nosuch")
    with pytest.raises(ModelError, match="does not exist; check the path"):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(ModelError, match="holds no checkpoint"):
        load_model(tmp_path)
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"unsupported type \.h5; expected \.safetensors"):
        load_model(tmp_path / "m.h5")
    with pytest.raises(ConfigError, match="'gpu' is not a torch device"):
        load_model("default", device="gpu")


def test_packaged_null_model_has_the_shipped_models_contract_and_rebuilds_identically(tmp_path: Path) -> None:
    from segpipe.core.files import sha256_file
    from segpipe.models.make_null import make_null, null_model_path

    null, shipped = load_model("null"), load_model("default")
    assert null.metadata.architecture == "pointwise"
    for field in ("bands", "classes", "mean", "std", "tile_size", "halo", "input"):
        assert getattr(null.metadata, field) == getattr(shipped.metadata, field), field
    assert sum(p.numel() for p in null.module.parameters()) == 3 * 6 + 6  # one 1x1 convolution
    x = torch.randn(2, 3, 24, 40)
    with torch.inference_mode():
        assert torch.allclose(null.module(x), null.module.conv(x), atol=1e-5)  # its matrix product is that conv
    rebuilt = make_null(tmp_path / "null.safetensors")
    assert sha256_file(rebuilt) == sha256_file(null_model_path())


def test_missing_sidecar(tmp_path: Path) -> None:
    _, _, weights = _saved(tmp_path)
    weights.with_suffix(".json").unlink()
    with pytest.raises(
        ModelError, match=r"has no segpipe metadata \(model\.segpipe\.json or model\.json beside it\); segpipe train"
    ):
        load_model(weights)


def test_sidecar_without_weights(tmp_path: Path) -> None:
    sidecar = write_metadata(make_metadata(), tmp_path / "lonely.json")
    with pytest.raises(ModelError, match="has no model file next to it"):
        load_model(sidecar)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupted_safetensors_refused(tmp_path: Path, damage: str) -> None:
    _, _, weights = _saved(tmp_path)
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        weights.write_bytes(bytes(range(256)) * 10)
    else:
        weights.write_bytes(data[:8] + b"[" + data[9:])
    with pytest.raises(ModelError, match=r"is not a valid safetensors file .*re-download or re-save it"):
        load_model(weights)


def _rewrite_sidecar(weights: Path, **changes: object) -> None:
    sidecar = weights.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data.update(changes)
    sidecar.write_text(json.dumps(data))


def test_weights_must_match_architecture(tmp_path: Path) -> None:
    _, _, weights = _saved(tmp_path)
    _rewrite_sidecar(weights, arguments={**TINY_ARGUMENTS, "base_channels": 8})
    with pytest.raises(
        ModelError,
        match=r"shape mismatch \(weights vs architecture\): .*"
        r"convs\.0\.weight \(16, 8, 3, 3\) vs \(32, 16, 3, 3\)",
    ):
        load_model(weights)
    plain = {k: v for k, v in TINY_ARGUMENTS.items() if k not in ("heads", "window")}
    _rewrite_sidecar(weights, architecture="unet", arguments=plain)
    with pytest.raises(ModelError, match=r"unexpected \d+ tensor\(s\): bottleneck\.attention"):
        load_model(weights)
    _rewrite_sidecar(weights, architecture="segformer")
    with pytest.raises(ModelError, match="unknown architecture 'segformer'; known architectures"):
        load_model(weights)
    _rewrite_sidecar(weights, architecture="onnx")
    with pytest.raises(ModelError, match=r"'onnx' is for \.onnx/\.pt files, but the weights are safetensors"):
        load_model(weights)


def test_classes_and_bands_must_match_network(tmp_path: Path) -> None:
    model, _, weights = _saved(tmp_path)
    _rewrite_sidecar(weights, classes=[{"name": "a", "colour": "#000000"}])
    with pytest.raises(ModelError, match="the network has num_classes=4 but 'classes' lists 1; make them agree"):
        load_model(weights)
    with pytest.raises(ModelError, match="has in_channels=3 but 'bands' lists 2"):
        save_checkpoint(model, make_metadata(bands=("a", "b"), mean=(0, 0), std=(1, 1)), tmp_path / "x")
    with pytest.raises(ModelError, match="'size_multiple' is 2 but the network needs multiples of 4"):
        save_checkpoint(model, make_metadata(size_multiple=2), tmp_path / "x")
    other = build_model("unet", {"in_channels": 3, "num_classes": 4, "base_channels": 4, "depth": 2})
    with pytest.raises(ModelError, match=r"save_checkpoint .*missing \d+ tensor\(s\)"):
        save_checkpoint(other, make_metadata(), tmp_path / "x")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()


def test_non_finite_weights_refused(tmp_path: Path) -> None:
    metadata = make_metadata()
    model = build_model(metadata.architecture, metadata.arguments)
    assert isinstance(model, UNet)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ModelError, match=r"non-finite values \(NaN or inf\) in head\.weight"):
        save_checkpoint(model, metadata, tmp_path / "m")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "m.safetensors").write_bytes(safetensors_save(state))
    write_metadata(metadata, tmp_path / "m.json")
    with pytest.raises(ModelError, match=r"non-finite values .* in head\.weight; retrain or re-save"):
        load_model(tmp_path / "m.safetensors")


def _torch_save(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _fake_torchscript(payload: bytes) -> bytes:
    """A zip shaped like torch.jit.save output whose data.pkl is a malicious pickle."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model/code/__torch__/model.py", "class Model(Module):\n  pass\n")
        archive.writestr("model/constants.pkl", pickle.dumps(()))
        archive.writestr("model/data.pkl", payload)
        archive.writestr("model/version", "3\n")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("model.pth", lambda p: pickle.dumps(p)),
        ("model.pkl", lambda p: pickle.dumps(p)),
        ("model.ckpt", lambda p: pickle.dumps(p)),
        ("model.safetensors", lambda p: pickle.dumps(p)),
        ("model.safetensors", lambda p: pickle.dumps(p, protocol=0)),
        ("model.safetensors", lambda p: _torch_save({"state_dict": p})),
        ("model.pt", lambda p: _torch_save({"state_dict": p})),
        ("model.pt", lambda p: pickle.dumps(p)),
        ("model.onnx", lambda p: pickle.dumps(p)),
    ],
)
def test_pickle_refused_and_not_executed(tmp_path: Path, name: str, make: Callable[[Evil], bytes]) -> None:
    marker = tmp_path / "pwned"
    control = tmp_path / "control"
    # The payload is live: unpickling it does create its marker file.
    pickle.loads(pickle.dumps(Evil(str(control)))).close()
    assert control.exists()
    path = tmp_path / name
    path.write_bytes(make(Evil(str(marker))))
    write_metadata(make_metadata(architecture="torchscript"), path)
    for target in (path, path.with_suffix(".json"), tmp_path):
        with pytest.raises(ModelError, match="segpipe never unpickles") as error:
            load_model(target)
        assert "save_checkpoint" in str(error.value)
    assert not marker.exists()


def test_torchscript_lookalike_with_pickle_payload_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(_fake_torchscript(pickle.dumps(Evil(str(marker)))))
    write_metadata(make_metadata(architecture="torchscript"), path)
    with pytest.raises(ModelError, match="cannot load as TorchScript"):
        load_model(path)
    assert not marker.exists()
