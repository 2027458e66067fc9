"""Where a run's work runs: in this process, on a local Ray instance, or on a cluster (``--executor``,
``--ray-address``), decided once per run or per night (:func:`session_for`)."""

from __future__ import annotations

from segpipe.core.runtime import local_gpus
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import RunOptions

#: Scenes of at most this many tiles run in-process on the embedded defaults (no Ray start-up).
IN_PROCESS_TILES = 8


def auto_uses_ray(*, address: str | None, executor: str, device: str, workers: int | None, tiles: int) -> bool:
    """Whether a run should use Ray: always on a cluster or when asked (``executor="ray"``); never with
    ``executor="local"``; on ``auto``, only where Ray buys something: several workers or GPUs, or a scene large
    enough (more than :data:`IN_PROCESS_TILES` tiles) that isolating the model in an actor that survives a crash
    is worth Ray's start-up (a few seconds)."""
    if address or executor == "ray":
        return True
    if executor == "local":
        return False
    if (workers or 1) > 1:
        return True
    if device != "cpu" and local_gpus() > 1:
        return True
    return tiles > IN_PROCESS_TILES


def session_for(options: RunOptions, *, tiles: int = 0) -> Session:
    """A session for a run of ``options`` over ``tiles`` tiles (a data set's night: 0, Ray only when asked or
    needed for workers, GPUs or a cluster; see :func:`auto_uses_ray`)."""
    uses_ray = auto_uses_ray(
        address=options.ray_address,
        executor=options.executor,
        device=options.device,
        workers=options.workers,
        tiles=tiles,
    )
    return Session(address=options.ray_address, ray=uses_ray, connect_timeout=options.ray_connect_timeout)
