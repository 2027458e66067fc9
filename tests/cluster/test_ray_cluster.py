"""A scene whose input, work store, model and outputs live on object storage, segmented by actors on two Ray nodes
(two raylets on this machine, Ray's own multi-node harness), gives the local run's bytes, and survives losing the
node that is not the head."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from segpipe.core import objects
from segpipe.core.errors import ConfigError
from segpipe.pipeline import store as ws
from segpipe.pipeline.reach import cluster_paths_problem
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.session import Session
from segpipe.pipeline.settings import RunSettings
from tests.cluster.conftest import S3Server
from tests.cluster.test_object_storage import _wait_for_tiles, local_run, upload_inputs

ON_CLUSTER = {"tile_size": 64, "halo": 16}


def test_two_nodes_share_the_work_and_give_the_local_bytes(
    s3: S3Server, ray_cluster: Any, data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)
    settings = RunSettings(**urls, ray_address=ray_cluster.address, blend="cosine", **ON_CLUSTER)  # type: ignore[arg-type]
    summary = run_scene(settings)
    mask, probabilities = local_run(data_dir, rgb_checkpoint, tmp_path, blend="cosine")
    assert objects.read_bytes(urls["output"]) == mask
    assert objects.read_bytes(urls["probabilities"]) == probabilities
    assert summary["workers"] == 2, "one segmenter per node"
    assert len(summary["nodes"]) == 2 and all(n > 0 for n in summary["nodes"].values()), summary["nodes"]
    # only indices, URLs and small stats crossed the driver: about 1 KB per tile here, none of the pixels
    assert summary["driver_bytes"] < 2000 * summary["tiles"]["total"], summary["driver_bytes"]


def test_a_session_serves_scenes_with_warm_segmenters(
    s3: S3Server, ray_cluster: Any, data_dir: Path, rgb_checkpoint: Path, slow_checkpoint: Path
) -> None:
    """Two scenes with one model share the same actors; a scene with another model gets actors of its own, and the
    first model's make room for them (the two nodes have one CPU each)."""
    urls = upload_inputs(s3, data_dir, rgb_checkpoint)
    with Session(address=ray_cluster.address) as session:
        first = run_scene(RunSettings(**urls, ray_address=ray_cluster.address, **ON_CLUSTER), session=session)  # type: ignore[arg-type]
        actors = [a._actor_id for pool in session.pools.values() for a in pool.actors]
        second = run_scene(
            RunSettings(**{**urls, "output": "s3://out/y/mask.tif", "probabilities": None}, **ON_CLUSTER),  # type: ignore[arg-type]
            session=session,
        )
        assert [a._actor_id for pool in session.pools.values() for a in pool.actors] == actors, "the same actors"
        third = run_scene(
            RunSettings(
                **{**urls, "output": "s3://out/z/mask.tif", "probabilities": None, "model": str(slow_checkpoint)},
                **ON_CLUSTER,  # type: ignore[arg-type]
            ),
            session=session,
        )
        assert [pool.spec.model for pool in session.pools.values()] == [str(slow_checkpoint)]
        assert not set(actors) & {a._actor_id for pool in session.pools.values() for a in pool.actors}
    assert first["tiles"]["computed"] == second["tiles"]["computed"] == third["tiles"]["computed"] > 0
    assert objects.read_bytes("s3://out/y/mask.tif") == objects.read_bytes(urls["output"])


def test_losing_the_other_node_mid_run_finishes_on_the_head(
    s3: S3Server, ray_cluster: Any, data_dir: Path, slow_checkpoint: Path, tmp_path: Path
) -> None:
    urls = upload_inputs(s3, data_dir, slow_checkpoint)
    settings = RunSettings(**urls, ray_address=ray_cluster.address, batch_size=4, **ON_CLUSTER)  # type: ignore[arg-type]
    store_url = ws.store_url(urls["work_dir"], urls["input"])
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_scene(settings)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    _wait_for_tiles(store_url, 12)
    worker_node = next(node for node in ray_cluster.list_all_nodes() if not node.head)
    ray_cluster.remove_node(worker_node, allow_graceful=False)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["summary"]["tiles"]["computed"] + outcome["summary"]["tiles"]["reused"] > 12
    mask, probabilities = local_run(data_dir, slow_checkpoint, tmp_path, batch_size=4)
    assert objects.read_bytes(urls["output"]) == mask
    # The tiles the lost node had not finished were recomputed by the head's segmenter (one torch thread, while the
    # local run has two): float sums in another order move a softmax by ~6e-8 (measured for this network), which
    # can tip a probability across one 1/254 step. The mask is the contract here; probabilities agree within a step.
    with (
        rasterio.open(io.BytesIO(objects.read_bytes(urls["probabilities"]))) as got,
        rasterio.open(io.BytesIO(probabilities)) as want,
    ):
        difference = np.abs(got.read().astype(np.int16) - want.read().astype(np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-4, (difference.max(), (difference > 0).sum())


def test_paths_only_the_driver_sees_are_refused_on_a_cluster_of_several_machines() -> None:
    """A local scene, work store or model is fine when every node runs on the driver's machine (the harness), and
    refused, naming the option, when a node runs elsewhere."""
    here = [{"NodeManagerAddress": "127.0.0.1"}, {"NodeManagerAddress": "127.0.0.1"}]
    away = [*here, {"NodeManagerAddress": "10.0.0.7"}]
    local = RunSettings(input="/data/scene.tif", output="/out/mask.tif", work_dir="/work", model="/m/x.safetensors")
    assert cluster_paths_problem(local, here, "127.0.0.1") is None
    problem = cluster_paths_problem(local, away, "127.0.0.1")
    assert problem is not None and problem.startswith("on a Ray cluster of several machines")
    for option in ("INPUT", "--work-dir", "--model"):
        assert option in problem, problem
    remote = RunSettings(input="s3://b/scene.tif", output="/out/mask.tif", work_dir="s3://b/work", model="default")
    assert cluster_paths_problem(remote, away, "127.0.0.1") is None, "a local OUTPUT is written by the driver"


def test_unreachable_cluster_and_auto_without_one_are_one_clear_error(tmp_path: Path) -> None:
    for address, message in (
        ("127.0.0.1:9", "cannot reach the Ray cluster at 127.0.0.1:9"),
        ("auto", "--ray-address auto found no running Ray cluster"),
    ):
        with pytest.raises(ConfigError, match=message), Session(address=address, connect_timeout=10):
            pass
