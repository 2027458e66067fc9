"""What a cluster's nodes can reach: on a Ray cluster of several machines, a run refuses, before any work, the
files only the driver's machine sees."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segpipe.core.location import Location
from segpipe.core.paths import is_remote
from segpipe.pipeline.settings import RunSettings


def _local(path: str) -> bool:
    return Location(path).is_local


def cluster_paths_problem(
    settings: RunSettings, nodes: Sequence[dict[str, Any]], driver_ip: str, *, slide: bool = False
) -> str | None:
    """What of ``settings`` only this machine sees, when the cluster has nodes on other machines; None when all is
    reachable from every node.

    The scene, the work store and the model must be URLs (or a packaged model name) on such a cluster; the outputs
    may stay local, since the driver writes local outputs itself. A whole-slide image (``slide``) is the exception:
    OpenSlide reads local files only, so its INPUT is a path that must be on shared storage mounted at the same
    path on every node (a worker that does not see it fails with that message; a slide at a URL is refused when
    it is opened, :func:`segpipe.pipeline.read.open_source`).
    """
    if all(n.get("NodeManagerAddress") == driver_ip for n in nodes):
        return None
    local = []
    if not slide and not is_remote(settings.input) and _local(settings.input):
        local.append("INPUT")
    if not settings.work_dir or _local(settings.work_dir):
        local.append("--work-dir")
    if _local(settings.model) and ("/" in settings.model or "." in Path(settings.model).name):
        local.append("--model")
    if settings.model_metadata and _local(settings.model_metadata):
        local.append("--model-metadata")
    if not local:
        return None
    return (
        f"on a Ray cluster of several machines, {', '.join(local)} must be on object storage (s3://, gs://, az://) "
        "that every node reads; the other machines cannot see this machine's files (see docs/cluster.md)"
        + (
            "; the whole-slide INPUT stays a path, on shared storage mounted at the same path on every node "
            "(OpenSlide reads local files only)"
            if slide
            else ""
        )
    )
