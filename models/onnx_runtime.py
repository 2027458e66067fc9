"""onnxruntime, the optional extra that runs ONNX models (``pip install segpipe[onnx]``): imported when a model
needs it, with an error that says how to install it. No torch here."""

from __future__ import annotations

from typing import Any

from segpipe.core.errors import ModelError


def import_onnxruntime() -> Any:
    """The ``onnxruntime`` module.

    Raises:
        ModelError: it is not installed (the message says how to install it).
    """
    try:
        import onnxruntime  # lazy: optional extra onnx (segpipe[onnx]); 0.25 s
    except ImportError:
        raise ModelError(
            "ONNX models need onnxruntime, which is not installed; pip install onnxruntime "
            "(or onnxruntime-gpu for CUDA)"
        ) from None
    return onnxruntime
