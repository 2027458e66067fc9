"""What a model from elsewhere (ONNX or TorchScript) says about itself: input channels, a fixed input size, output
classes, and the size multiple its height and width need, found from its signature and a few small probe runs.

:func:`inspect_model` is what ``segpipe model init`` builds a metadata file from; what it cannot find (class names
and colours, band names, normalisation, the input contract) the user gives.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segpipe.core.errors import ModelError
from segpipe.models.onnx_runtime import import_onnxruntime

#: Size multiples probed, smallest first (a U-Net of depth d needs 2**d).
PROBED_MULTIPLES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Signature:
    """A model's shapes (pixels for sizes; layout BCHW).

    Attributes:
        architecture: ``onnx`` or ``torchscript``.
        in_channels: Input channels, or None when the model does not say (TorchScript).
        input_size: The fixed input side, or None for any size.
        classes: Output channels (logits per class).
        size_multiple: The smallest multiple of which any input side works (1 for a fixed input size).
    """

    architecture: str
    in_channels: int | None
    input_size: int | None
    classes: int
    size_multiple: int


class _Runner:
    """Run a model on a float32 array (B, C, H, W); return its first output as an array, or raise."""

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        self.architecture = "onnx" if path.suffix.lower() == ".onnx" else "torchscript"
        self.session: Any = None
        self.module: Any = None
        if self.architecture == "onnx":
            ort = import_onnxruntime()
            try:
                self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
            except Exception as error:  # onnxruntime's own exception types
                raise ModelError(f"model {path}: cannot load as ONNX ({str(error)[:200]})") from None
        else:
            import torch  # lazy: 2 s; ONNX models do without it, and segpipe --help imports this module

            try:
                self.module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
            except Exception as error:  # torch's errors for a malformed archive
                raise ModelError(
                    f"model {path}: cannot load as TorchScript ({str(error)[:200]}); export it with torch.jit.save"
                ) from None

    def shape(self) -> list[Any]:
        return list(self.session.get_inputs()[0].shape) if self.session is not None else [None, None, None, None]

    def output_shape(self) -> list[Any]:
        return list(self.session.get_outputs()[0].shape) if self.session is not None else [None, None, None, None]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.session is not None:
            spec = self.session.get_inputs()[0]
            return np.asarray(self.session.run(None, {spec.name: x})[0])
        import torch  # lazy: 2 s, for TorchScript models only

        with torch.inference_mode():
            y = self.module(torch.from_numpy(x))
        if not isinstance(y, torch.Tensor):
            raise ModelError(f"the model returned {type(y).__name__}, expected one logits tensor")
        return y.numpy()


def _fixed(value: Any) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def inspect_model(path: str | Path, *, in_channels: int | None = None) -> Signature:
    """Find a model's shapes from its signature and probe runs on zeros.

    Args:
        path: An ``.onnx`` file, or a TorchScript archive (``.pt``/``.ts``).
        in_channels: The number of input bands, when the model does not say (TorchScript).

    Raises:
        ModelError: the file cannot be loaded, the channels are unknown, or no probe size works.
    """
    path = Path(path)
    runner = _Runner(path)
    shape = runner.shape()
    channels = _fixed(shape[1]) if len(shape) == 4 else None
    if len(shape) != 4:
        raise ModelError(f"model {path}: input has shape {shape}, expected (B, C, H, W)")
    if channels is not None and in_channels is not None and channels != in_channels:
        raise ModelError(f"model {path} takes {channels} input channels, but {in_channels} bands were given")
    channels = channels or in_channels
    if channels is None:
        raise ModelError(f"model {path} does not say how many bands it takes; give them with --bands")
    batch = _fixed(shape[0]) or 1
    fixed = [_fixed(s) for s in shape[2:]]
    if any(fixed):
        if fixed[0] != fixed[1]:
            raise ModelError(f"model {path}: input {shape[2]} x {shape[3]} is not square; segpipe's tiles are square")
        side = int(fixed[0] or 0)
        y = _probe(runner, batch, channels, side, path)
        if y is None:
            raise ModelError(f"model {path} fails on a zero input of its own size {side} x {side}")
        return Signature(runner.architecture, channels, side, int(y.shape[1]), 1)
    for multiple in PROBED_MULTIPLES:
        side = multiple * (1 + 2 * max(1, 48 // multiple))  # an odd multiple of it, about 100 pixels
        y = _probe(runner, batch, channels, side, path)
        if y is not None:
            return Signature(runner.architecture, channels, None, int(y.shape[1]), multiple)
    raise ModelError(
        f"model {path}: no probed input size worked (odd multiples of {', '.join(map(str, PROBED_MULTIPLES))}); "
        "give --size-multiple, or check the export"
    )


def _probe(runner: _Runner, batch: int, channels: int, side: int, path: Path) -> np.ndarray | None:
    """The output for a zero input of ``side`` pixels, or None when the model fails on it or its output is not
    (B, classes, side, side) logits."""
    x = np.zeros((batch, channels, side, side), dtype=np.float32)
    try:
        y = runner(x)
    except ModelError:
        raise
    except Exception:  # the runtime refuses this size
        return None
    if y.ndim != 4 or y.shape[0] != batch or y.shape[2:] != (side, side):
        if y.ndim == 4 and y.shape[2:] != (side, side):
            return None
        raise ModelError(
            f"model {path} returned shape {tuple(y.shape)} for input {tuple(x.shape)}; segpipe needs logits "
            f"(B, classes, H, W) on the input's grid"
        )
    return y
