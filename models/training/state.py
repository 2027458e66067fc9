"""Resume state of a training run, without pickle: ``state/last.safetensors`` (model weights, the weight average,
optimizer moments, RNG states) and ``state/last.json`` (epoch, optimizer and scheduler settings, history, best
score, the configuration's fingerprint, the SHA-256 of the tensors file), both written atomically after every
epoch. Training tiles are a pure function of (seed, epoch, index), so no data-loader state is needed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from segpipe.core.errors import ModelError
from segpipe.core.files import atomic_output, sha256_file
from segpipe.core.location import Location
from segpipe.models.training.config import EpochRecord

STATE_VERSION = 1


def save_state(
    directory: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    info: Mapping[str, Any],
    average: nn.Module | None = None,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
    }
    if average is not None:
        tensors.update({f"ema.{k}": v.detach().to("cpu").contiguous().clone() for k, v in average.state_dict().items()})
    opt = optimizer.state_dict()
    opt_extra: dict[str, dict[str, Any]] = {}
    for idx, entry in opt["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                opt_extra.setdefault(str(idx), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state: Any = np.random.get_state()
    py_state: Any = random.getstate()
    data = {
        **info,
        "version": STATE_VERSION,
        "optimizer": {"param_groups": opt["param_groups"], "state": opt_extra},
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": {
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [py_state[0], list(py_state[1]), py_state[2]],
        },
    }
    try:
        text = json.dumps(data)
    except TypeError as exc:  # a torch upgrade put a non-JSON value in a state_dict: fail loudly
        raise ModelError(f"training state is not JSON-serialisable ({exc}); refusing to fall back to pickle") from None
    del text
    weights = directory / "last.safetensors"
    with atomic_output(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "segpipe-train-state"})
    data["tensors_sha256"] = sha256_file(weights)
    Location(directory / "last.json").write_json(data, indent=1)
    return weights


def load_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    weights, meta = directory / "last.safetensors", directory / "last.json"
    try:
        data = json.loads(meta.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{meta}: cannot read the training state ({exc}); delete {directory} to start over") from None
    if data.get("version") != STATE_VERSION:
        raise ModelError(
            f"{meta}: state version {data.get('version')}, expected {STATE_VERSION}; delete {directory} to start over"
        )
    if not weights.is_file() or sha256_file(weights) != data.get("tensors_sha256"):
        raise ModelError(
            f"{weights} is missing or does not match {meta} (interrupted while saving?); delete "
            f"{directory} to start over"
        )
    return load_file(str(weights)), data


def restore(
    tensors: Mapping[str, torch.Tensor],
    data: Mapping[str, Any],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    average: nn.Module | None = None,
) -> None:
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    if average is not None:
        average.load_state_dict({k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = value
    for idx, extra in data["optimizer"]["state"].items():
        opt_state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": opt_state, "param_groups": data["optimizer"]["param_groups"]})
    scheduler.load_state_dict(data["scheduler"])
    if data["scaler"]:
        scaler.load_state_dict(data["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    np_state = data["rng"]["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    py_state = data["rng"]["python"]
    random.setstate((py_state[0], tuple(py_state[1]), py_state[2]))


def record_from_json(d: Mapping[str, Any]) -> EpochRecord:
    names = {f.name for f in dataclasses.fields(EpochRecord)}
    return EpochRecord(**{k: v for k, v in d.items() if k in names})
