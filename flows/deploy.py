"""Deployments: ``segment_dataset`` registered on a Prefect server with a cron schedule in a time zone, and served
(``segpipe serve``): the serving process runs the scheduled (and manually triggered) flow runs.

Point ``PREFECT_API_URL`` at a Prefect server to see and manage the runs in its UI; without it the schedule lives
in a temporary API server for as long as the serving process runs.
"""

from __future__ import annotations

from typing import Any

from prefect.schedules import Cron

from segpipe.core.options import values_of
from segpipe.flows.dataset import segment_dataset
from segpipe.pipeline.settings import DatasetOptions, RunOptions, ScheduleOptions


def deployment_parameters(
    source: str, output_dir: str, options: RunOptions | None, dataset: DatasetOptions | None
) -> dict[str, Any]:
    """The deployment's parameters: JSON values that :func:`segment_dataset` turns back into its options."""
    return {
        "source": source,
        "output_dir": output_dir,
        "options": values_of(options or RunOptions()),
        "dataset": values_of(dataset or DatasetOptions()),
    }


def serve_nightly(
    source: str,
    output_dir: str,
    *,
    options: RunOptions | None = None,
    dataset: DatasetOptions | None = None,
    schedule: ScheduleOptions | None = None,
) -> None:
    """Register the deployment ``segment_dataset/<name>`` with its cron schedule in its time zone (see
    :class:`~segpipe.pipeline.settings.ScheduleOptions`) and serve it (blocks; Ctrl-C or SIGTERM stops it)."""
    when = schedule or ScheduleOptions()
    segment_dataset.serve(
        name=when.name,
        schedules=[Cron(when.cron, timezone=when.timezone)],
        parameters=deployment_parameters(source, output_dir, options, dataset),
        description=f"segment new and changed scenes of {source} into {output_dir}",
    )
