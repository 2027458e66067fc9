"""The ``segment_scene`` Prefect flow: one task per stage of :func:`pipeline.run.run_scene`.

With no configuration Prefect runs in ephemeral mode (a temporary local API on loopback, no server to run);
with ``PREFECT_API_URL`` set, runs are recorded on that server and can be scheduled (see :mod:`flows.deploy`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NONE

from pipeline.plan import RunSettings
from pipeline.run import run_scene


def as_task(stage: Callable[..., Any]) -> Callable[..., Any]:
    """A stage as a Prefect task named after it (``ingest``, ``infer``, ...), never cached: the work store is
    the cache, and it knows what is complete."""
    return task(name=stage.__name__.removesuffix("_stage"), cache_policy=NONE)(stage)


@flow(name="segment_scene", persist_result=False, validate_parameters=False)
def segment_scene(settings: RunSettings) -> dict[str, Any]:
    """Segment one scene (see :func:`pipeline.run.run_scene`); returns the run summary."""
    return run_scene(settings, wrap=as_task)
