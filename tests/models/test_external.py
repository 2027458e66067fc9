"""ONNX (onnxruntime) and TorchScript models through load_model, checked against PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from segpipe.core.errors import ModelError
from segpipe.models.checkpoint import load_model, write_metadata
from segpipe.models.networks import UNet
from tests.models.conftest import TINY_ARGUMENTS, make_metadata, randomise

FULL: dict[str, Any] = {"channel_attention": "cbam", "self_attention": "local", "attention_gates": True}


def _tiny(**kwargs: Any) -> UNet:
    return randomise(UNet(**{**TINY_ARGUMENTS, **kwargs}))


def _export_onnx(model: torch.nn.Module, path: Path, size: int, dynamic: bool) -> None:
    x = torch.randn(1, 3, size, size)
    axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shape checks turned into constants
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes=axes if dynamic else None,
        )


def test_onnx_fixed_size_matches_pytorch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    model = _tiny(**FULL)
    path = tmp_path / "net.onnx"
    _export_onnx(model, path, 32, dynamic=False)
    write_metadata(make_metadata(architecture="onnx", input_size=32, tile_size=24, halo=4), path)
    loaded = load_model(path)
    assert loaded.metadata.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = model(x)
        torch.testing.assert_close(loaded.module(x), expected, rtol=0, atol=1e-4)
    with pytest.raises(ModelError, match=r"accepts only 32 x 32 inputs \(its 'input_size'\), got 64 x 64"):
        loaded.module(torch.randn(1, 3, 64, 64))


def test_onnx_dynamic_size(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    model = _tiny()
    path = tmp_path / "net.onnx"
    _export_onnx(model, path, 32, dynamic=True)
    write_metadata(make_metadata(architecture="onnx"), path)
    loaded = load_model(tmp_path)
    for size in (32, 48):
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=1e-4)


def test_onnx_sidecar_must_fit(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")  # torch.onnx.export needs it
    path = tmp_path / "net.onnx"
    _export_onnx(_tiny(), path, 32, dynamic=False)
    write_metadata(make_metadata(architecture="onnx"), path)
    with pytest.raises(ModelError, match=r"fixed size 32 x 32; set 'input_size' in the JSON sidecar"):
        load_model(path)
    write_metadata(make_metadata(architecture="onnx", input_size=48, tile_size=40), path)
    with pytest.raises(ModelError, match="differs from 'input_size' 48"):
        load_model(path)
    classes = make_metadata().classes[:3]
    write_metadata(make_metadata(architecture="onnx", input_size=32, classes=classes), path)
    with pytest.raises(ModelError, match="ONNX output has 4 channels but the sidecar lists 3 classes"):
        load_model(path)
    write_metadata(make_metadata(architecture="attention_unet", input_size=32), path)
    with pytest.raises(ModelError, match=r"'architecture' must be 'onnx' for a \.onnx model file"):
        load_model(path)
    path.write_bytes(b"\x08\x07garbage")
    write_metadata(make_metadata(architecture="onnx", input_size=32), path)
    with pytest.raises(ModelError, match="cannot load as ONNX"):
        load_model(path)


def test_torchscript_matches_pytorch(tmp_path: Path) -> None:
    model = _tiny(**FULL)
    path = tmp_path / "net.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 32))
    torch.jit.save(traced, str(path))
    write_metadata(make_metadata(architecture="torchscript"), path)
    loaded = load_model(path.with_suffix(".json"))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.module(x), model(x), rtol=0, atol=1e-4)
    with pytest.raises(ModelError, match=r"expected input \(B, 3, H, W\), got \(1, 2, 32, 32\)"):
        loaded.module(torch.randn(1, 2, 32, 32))
    write_metadata(make_metadata(architecture="torchscript", classes=make_metadata().classes[:2]), path)
    with pytest.raises(
        ModelError, match=r"returned shape \(1, 4, 32, 32\) .* expected logits \(1, 2, 32, 32\)"
    ):
        load_model(path).module(torch.randn(1, 3, 32, 32))


def test_missing_onnxruntime_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "net.onnx"
    path.write_bytes(b"\x08\x07")
    write_metadata(make_metadata(architecture="onnx"), path)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ModelError, match="pip install onnxruntime"):
        load_model(path)
