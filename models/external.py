"""Models from elsewhere: ONNX (through onnxruntime) and TorchScript, wrapped as ``nn.Module``s.

Both are loaded from bytes already read (and checksummed) by :mod:`segpipe.models.checkpoint`. The wrappers check the
input against the sidecar (bands, fixed input size) and the output against the classes, so a mismatched
sidecar fails loudly on the first batch instead of producing a wrong mask.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from segpipe.core.errors import ModelError
from segpipe.models.metadata import ModelMetadata
from segpipe.models.onnx_runtime import import_onnxruntime

logger = logging.getLogger(__name__)

_ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class ExternalModel(nn.Module):
    """Shape checks around an external network: (B, len(bands), H, W) -> logits (B, len(classes), H, W).

    Args:
        metadata: The sidecar; ``bands``, ``classes``, ``size_multiple`` and ``input_size`` are enforced.
        source: The model file, named in errors.
    """

    def __init__(self, metadata: ModelMetadata, source: str) -> None:
        super().__init__()
        self.in_channels = len(metadata.bands)
        self.num_classes = len(metadata.classes)
        self.size_multiple = metadata.size_multiple
        self.input_size = metadata.input_size
        self.source = source

    def check_input(self, x: Tensor) -> None:
        """Raise ModelError unless ``x`` fits the sidecar's bands, size multiple and fixed input size."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(
                f"model {self.source}: expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        if self.input_size is not None and (h, w) != (self.input_size, self.input_size):
            raise ModelError(
                f"model {self.source}: accepts only {self.input_size} x {self.input_size} inputs (its "
                f"'input_size'), got {h} x {w}; use tile_size + 2 * halo = {self.input_size}"
            )
        if h % self.size_multiple or w % self.size_multiple:
            raise ModelError(
                f"model {self.source}: input height and width must be multiples of {self.size_multiple}, "
                f"got {h} x {w}; pad the tile"
            )

    def check_output(self, x: Tensor, y: Tensor) -> None:
        """Raise ModelError unless ``y`` is float logits (B, num_classes, H, W) for input ``x``."""
        if not y.is_floating_point():
            raise ModelError(
                f"model {self.source}: returned {str(y.dtype).removeprefix('torch.')} values, expected float logits "
                "(B, classes, H, W); export the network before its argmax"
            )
        expected = (x.shape[0], self.num_classes, x.shape[2], x.shape[3])
        if tuple(y.shape) != tuple(expected):
            raise ModelError(
                f"model {self.source}: returned shape {tuple(y.shape)} for input {tuple(x.shape)}, expected "
                f"logits {expected}; the sidecar's classes or the export do not match the network"
            )


class TorchScriptModel(ExternalModel):
    """A TorchScript network (``torch.jit.save`` output) with the sidecar's shape checks.

    TorchScript archives contain code that the TorchScript interpreter runs; it cannot call Python, but load
    such models only from sources you trust.
    """

    def __init__(self, data: bytes, metadata: ModelMetadata, source: str, device: torch.device) -> None:
        super().__init__(metadata, source)
        try:
            self.network = torch.jit.load(io.BytesIO(data), map_location=device)
        except Exception as error:  # torch raises RuntimeError and friends for any malformed archive
            raise ModelError(
                f"model {source}: cannot load as TorchScript ({type(error).__name__}: {str(error)[:200]}); "
                "export it with torch.jit.trace/script and torch.jit.save"
            ) from None

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, classes, H, W) for normalised float input (B, bands, H, W)."""
        self.check_input(x)
        y = self.network(x)
        if not isinstance(y, Tensor):
            raise ModelError(f"model {self.source}: returned {type(y).__name__}, expected one logits tensor")
        self.check_output(x, y)
        return y


class OnnxModel(ExternalModel):
    """An ONNX network run by onnxruntime; ``forward`` takes and returns torch tensors.

    The CUDA execution provider is used when ``device`` is a CUDA device and onnxruntime has it (otherwise
    CPU, with a warning). Inputs are copied to host memory and outputs back to the input's device.
    """

    def __init__(self, data: bytes, metadata: ModelMetadata, source: str, device: torch.device) -> None:
        super().__init__(metadata, source)
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
            else:
                logger.warning("model %s: onnxruntime has no CUDA provider; running on CPU", source)
        else:
            options.intra_op_num_threads = torch.get_num_threads()
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for malformed models
            raise ModelError(
                f"model {source}: cannot load as ONNX ({type(error).__name__}: {str(error)[:200]}); "
                "check the file or re-export it"
            ) from None
        self._check_signature(metadata)

    def _check_signature(self, metadata: ModelMetadata) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelError(
                f"model {self.source}: ONNX graph has {len(inputs)} inputs and {len(outputs)} outputs; "
                "expected one image input and logits as the first output"
            )
        spec = inputs[0]
        if spec.type not in _ONNX_TYPES:
            raise ModelError(
                f"model {self.source}: ONNX input type {spec.type} is not supported; export float32"
            )
        self.input_name: str = spec.name
        self.input_dtype = _ONNX_TYPES[spec.type]
        shape = list(spec.shape)
        if len(shape) != 4:
            raise ModelError(f"model {self.source}: ONNX input has shape {shape}, expected (B, C, H, W)")
        # A graph exported with a fixed batch size is run in chunks of that size (the last one zero-padded).
        self.fixed_batch: int | None = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        if isinstance(shape[1], int) and shape[1] != self.in_channels:
            raise ModelError(
                f"model {self.source}: ONNX input has {shape[1]} channels but the sidecar lists "
                f"{self.in_channels} bands {list(metadata.bands)}; fix 'bands' in the JSON sidecar"
            )
        fixed = [side for side in shape[2:] if isinstance(side, int)]
        if fixed and metadata.input_size is None:
            raise ModelError(
                f"model {self.source}: ONNX input has a fixed size {shape[2]} x {shape[3]}; set 'input_size' "
                "in the JSON sidecar (or export with dynamic height and width)"
            )
        if fixed and any(side != metadata.input_size for side in fixed):
            raise ModelError(
                f"model {self.source}: ONNX input size {shape[2]} x {shape[3]} differs from 'input_size' "
                f"{metadata.input_size} in the JSON sidecar; fix one of them"
            )
        out_shape = list(outputs[0].shape)
        if len(out_shape) == 4 and isinstance(out_shape[1], int) and out_shape[1] != self.num_classes:
            raise ModelError(
                f"model {self.source}: ONNX output has {out_shape[1]} channels but the sidecar lists "
                f"{self.num_classes} classes; fix 'classes' in the JSON sidecar"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, classes, H, W) as float32 on ``x``'s device, for normalised input (B, bands, H, W)."""
        self.check_input(x)
        array = x.detach().to("cpu", torch.float32).contiguous().numpy().astype(self.input_dtype, copy=False)
        step = self.fixed_batch or len(array)
        parts = []
        for start in range(0, len(array), step):
            chunk = array[start : start + step]
            if len(chunk) < step:
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), chunk.dtype)])
            try:
                result = self.session.run(None, {self.input_name: chunk})[0]
            except Exception as error:  # onnxruntime's own exception types
                raise ModelError(
                    f"model {self.source}: onnxruntime failed on input {tuple(x.shape)} "
                    f"({type(error).__name__}: {str(error)[:300]})"
                ) from None
            if not np.issubdtype(np.asarray(result).dtype, np.floating):
                raise ModelError(
                    f"model {self.source}: returned {np.asarray(result).dtype} values, expected float logits "
                    "(B, classes, H, W); export the network before its argmax"
                )
            parts.append(np.asarray(result, dtype=np.float32)[: len(array) - start])
        y = torch.from_numpy(np.ascontiguousarray(np.concatenate(parts))).to(x.device)
        self.check_output(x, y)
        return y
