"""Run on a node of a Ray cluster whose GPUs are declared (``ray start --num-gpus 1``) but not real: start the
segmenters a run starts there, and print, as JSON, what each one holds.

    python tests/cluster/_placement.py HEAD:6379 MODEL

The session plans the pool exactly as a run does (``--device auto`` resolves to ``cuda`` on a cluster that has GPUs;
one segmenter per GPU, each claiming ``num_gpus=1``, so Ray pins it to one GPU id and sets its
``CUDA_VISIBLE_DEVICES``). Torch has no CUDA on this machine, so the segmenters load the model on the CPU while
holding their GPU: the placement is Ray's, the device is what they can run on here.
"""

from __future__ import annotations

import json
import sys

from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.session import Session


def main(address: str, model: str) -> None:
    with Session(address=address) as session:
        device = session.device("auto")
        workers, threads, resources = session.plan_pool(device, None)
        pool = session.segmenters(ModelSpec(model, None, "cpu", threads), workers, resources)
        held = session.ray.get([actor.placement.remote() for actor in pool.actors])
        print(json.dumps({"device": device, "workers": workers, "resources": resources, "segmenters": held}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
