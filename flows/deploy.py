"""Deployments: ``segment_dataset`` served on a cron schedule (``segpipe serve``).

Point ``PREFECT_API_URL`` at a Prefect server to see and manage the runs in its UI; without it the schedule lives
in Prefect's ephemeral API for as long as the serving process runs.
"""

from __future__ import annotations

from segpipe.core.options import values_of
from segpipe.flows.dataset import segment_dataset
from segpipe.pipeline.settings import RunOptions


def serve_nightly(
    input_dir: str,
    output_dir: str,
    *,
    options: RunOptions | None = None,
    probabilities: bool = False,
    cron: str = "0 2 * * *",
    name: str = "nightly",
) -> None:
    """Serve ``segment_dataset`` on a cron schedule (blocks; Ctrl-C stops it)."""
    segment_dataset.serve(
        name=name,
        cron=cron,
        parameters={
            "input_dir": input_dir,
            "output_dir": output_dir,
            "options": values_of(options or RunOptions()),
            "probabilities": probabilities,
        },
        description=f"segment new scenes of {input_dir} into {output_dir}",
    )
