"""Two machines for real: a Ray cluster whose nodes share no disk, no /tmp and no loopback (network and mount
namespaces, :mod:`tests.cluster.netns`), with an S3 server on the same private network.

Every run goes through the ``segpipe`` command as a user types it: on a node (``--ray-address HEAD:6379``), or
outside the cluster (``ray://HEAD:10001``). The scene, the model and the work stores live on S3; a run of the same
scene on this machine alone (``--executor local``, on one core as each node has one CPU) gives the bytes that every
cluster run must give. The tests share one cluster (a head and a worker of one CPU each), take about 5 minutes on 2
cores, and run in CI's ``pytest -m slow tests/cluster``. They skip, with the reason, where namespaces cannot be
made (not root, no ``ip``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from segpipe.core import objects
from tests.cluster.netns import BIN, REPO, S3_ENV, NetnsCluster, namespaces_problem, netns_cluster, wait_until

pytestmark = pytest.mark.slow

DATA = REPO / "tests" / "data"
SCENE = "s3://scenes/one/RGB.byte.tif"
MODEL = "s3://models/m/rgb.safetensors"
#: The options of every run: 156 tiles of 64 px (116 with valid pixels) with a 16 px halo, blended.
OPTIONS = ["--model", MODEL, "--tile-size", "64", "--halo", "16", "--blend", "cosine", "--no-prefect"]
#: The Ray task functions of the stages that run on the cluster's nodes (the segmenters are actors).
STAGE_TASKS = {"ingest": {"copy_region", "count_region"}, "stitch": {"stitch_block"}, "export": {"write_sink"}}
SEGPIPE = str(BIN / "segpipe")


@pytest.fixture(scope="module")
def cluster(rgb_checkpoint: Path) -> Iterator[NetnsCluster]:
    """A head and a worker, each in its own network and mount namespace, and the S3 server with the scene and the
    model on it; this process reaches S3 as the operator does (the AWS variables point at it for the module)."""
    problem = namespaces_problem()
    if problem:
        pytest.skip(f"no multi-node cluster on this machine: {problem}")
    with netns_cluster() as started, pytest.MonkeyPatch.context() as patch:
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": started.s3_url}.items():
            patch.setenv(key, value)
        for bucket in ("scenes", "models", "work", "out"):
            started.bucket(bucket)
        objects.upload_file(DATA / "RGB.byte.tif", SCENE)
        objects.upload_file(rgb_checkpoint, MODEL)
        objects.upload_file(rgb_checkpoint.with_suffix(".json"), MODEL.replace(".safetensors", ".json"))
        yield started


@pytest.fixture(scope="module")
def reference(rgb_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """SHA-256 of the mask and the probabilities of the same run on this machine alone, on one core (each node has
    one CPU, so its segmenter one torch thread: the same float sums in the same order)."""
    folder = tmp_path_factory.mktemp("reference")
    outputs = [str(folder / "mask.tif"), "--probabilities", str(folder / "probabilities.tif")]
    argv = [SEGPIPE, "run", str(DATA / "RGB.byte.tif"), *outputs, *OPTIONS, "--executor", "local"]
    argv[argv.index(MODEL)] = str(rgb_checkpoint)
    one_core = {min(os.sched_getaffinity(0))}
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, one_core)
    )
    assert done.returncode == 0, done.stderr
    return {name: sha256(folder / f"{name}.tif") for name in ("mask", "probabilities")}


# --- helpers ----------------------------------------------------------------------------------------------------


def outputs(name: str) -> list[str]:
    """OUTPUT, ``--probabilities`` and ``--work-dir`` of a run called ``name``, all on S3."""
    return [f"s3://out/{name}/mask.tif", "--probabilities", f"s3://out/{name}/probabilities.tif",
            "--work-dir", f"s3://work/{name}"]  # fmt: skip


def segpipe(cluster: NetnsCluster, *args: str, env: dict[str, str] | None = None) -> Any:
    """``segpipe ARGS`` on the head (in its namespaces, on its disk), to its end."""
    return cluster.run(cluster.head, [SEGPIPE, *args], env=env, timeout=600)


def outside(cluster: NetnsCluster, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``segpipe ARGS`` on this machine, which is no node of the cluster, to its end."""
    return subprocess.run([SEGPIPE, *args], env=cluster.outside_env(**env), capture_output=True, text=True, timeout=600)


def summary_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The run summary ``--json`` printed on stdout (stdout holds nothing else)."""
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout))


def sha256(where: str | Path) -> str:
    data = objects.read_bytes(where) if isinstance(where, str) else where.read_bytes()
    return hashlib.sha256(data).hexdigest()


def listed(prefix: str) -> list[str]:
    """Object keys under ``s3://bucket/prefix``."""
    import obstore

    url = objects.ObjectUrl.parse(prefix)
    return [o["path"] for page in obstore.list(objects.store_for(url), prefix=url.key or None) for o in page]


def tiles_by_node(cluster: NetnsCluster, summary: dict[str, Any]) -> dict[str, int]:
    """The summary's tiles per Ray node, by node name (``head``, ``worker1``)."""
    names = cluster.node_ids()
    return {names.get(node, node): tiles for node, tiles in summary["nodes"].items()}


def task_ids(cluster: NetnsCluster) -> set[str]:
    return {row["task_id"] for row in cluster.state("tasks")}


def stage_tasks(cluster: NetnsCluster, before: set[str]) -> dict[str, dict[str, int]]:
    """Stage -> node name -> its Ray tasks that finished there, among the tasks run since ``before`` (Ray's state
    API on the head's dashboard)."""
    names = cluster.node_ids()
    found: dict[str, collections.Counter[str]] = {stage: collections.Counter() for stage in STAGE_TASKS}
    for row in cluster.state("tasks", detail="true"):
        stage = next((s for s, functions in STAGE_TASKS.items() if row["name"] in functions), None)
        if stage and row["task_id"] not in before:
            assert row["state"] == "FINISHED", row
            found[stage][names.get(row["node_id"], row["node_id"])] += 1
    return {stage: dict(counts) for stage, counts in found.items()}


def done_tiles(store_url: str) -> int:
    """Tiles marked done in a work store (0 while it does not exist)."""
    import numpy as np

    from segpipe.pipeline import store as ws

    try:
        return int(np.asarray(ws.WorkStore(store_url, mode="r").array(ws.DONE)[...]).sum())
    except Exception:  # not created yet
        return 0


# --- runs ----------------------------------------------------------------------------------------------------


def test_a_scene_on_s3_is_segmented_on_both_nodes_into_the_local_bytes(
    cluster: NetnsCluster, reference: dict[str, str]
) -> None:
    """The driver on the head (``--ray-address HEAD:6379``); segmenters, ingest, stitch and export on the nodes,
    each node fetching the model into its own disk's cache; only indices and stats cross the driver."""
    before = task_ids(cluster)
    summary = summary_of(segpipe(cluster, "run", SCENE, *outputs("both"), *OPTIONS, "--ray-address",
                                 cluster.gcs_address, "--json"))  # fmt: skip
    assert sha256("s3://out/both/mask.tif") == reference["mask"]
    assert sha256("s3://out/both/probabilities.tif") == reference["probabilities"]

    tiles = tiles_by_node(cluster, summary)
    assert set(tiles) == {"head", "worker1"} and min(tiles.values()) > 0, tiles
    assert sum(tiles.values()) == summary["tiles"]["computed"] == 116
    stages = stage_tasks(cluster, before)
    assert all(stages.values()), f"every stage ran as Ray tasks on the nodes: {stages}"
    assert any(counts.get("worker1") for counts in stages.values()), stages
    assert summary["driver_bytes"] < 100 * summary["tiles"]["total"], summary["driver_bytes"]

    sha = summary["model"]["sha256"]
    for node in cluster.nodes.values():
        assert cluster.files(node, f"/tmp/home/.cache/segpipe/models/{sha}/rgb.safetensors"), node.name
        assert not cluster.files(node, "/tmp/segpipe-*"), f"{node.name}: scratch folders left"
    assert cluster.run(cluster.head, ["touch", "/tmp/on-the-head-only"]).returncode == 0
    assert not cluster.files(cluster.workers[0], "/tmp/on-the-head-only"), "each node has its own /tmp"


def test_a_driver_outside_the_cluster_connects_through_ray_client(
    cluster: NetnsCluster, reference: dict[str, str], tmp_path: Path
) -> None:
    """``ray://HEAD:10001`` from this machine, which is no node: the nodes segment from S3, and the outputs are
    written here, on the driver's own disk (their pixels then cross the driver, and only then)."""
    local = [str(tmp_path / "mask.tif"), "--probabilities", str(tmp_path / "probabilities.tif")]
    done = outside(cluster, "run", SCENE, *local, "--work-dir", "s3://work/client", *OPTIONS, "--ray-address",
                   cluster.client_address, "--json")  # fmt: skip
    summary = summary_of(done)
    assert sha256(tmp_path / "mask.tif") == reference["mask"]
    assert sha256(tmp_path / "probabilities.tif") == reference["probabilities"]
    tiles = tiles_by_node(cluster, summary)
    assert set(tiles) == {"head", "worker1"} and min(tiles.values()) > 0, tiles
    mask_pixels = summary["scene"]["width"] * summary["scene"]["height"]
    assert summary["driver_bytes"] >= mask_pixels, "the local outputs' pixels crossed the driver"


@pytest.mark.parametrize("token", ["wrong", "missing"])
def test_a_wrong_or_missing_token_is_one_line(cluster: NetnsCluster, token: str, tmp_path: Path) -> None:
    """On a node with ``HEAD:6379`` and from outside with ``ray://``: exit status 2, one line, nothing written.
    (Missing: an empty ``RAY_AUTH_TOKEN`` and a ``HOME`` without ``.ray/auth_token``.)"""
    value = "0" * 64 if token == "wrong" else ""
    sources = "in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH (a file) or ~/.ray/auth_token"
    want = {
        "wrong": "error: the Ray cluster at {} refused this process's authentication token; use the cluster's "
        f"token (`ray get-auth-token` on its head) {sources}",
        "missing": "error: no Ray authentication token to connect to the cluster at {}; put the cluster's token "
        f"(`ray get-auth-token` on its head) {sources}, or set RAY_AUTH_MODE=disabled for a cluster started "
        "without authentication",
    }[token]
    args = ["run", SCENE, *outputs("token"), *OPTIONS, "--ray-address"]
    on_node = segpipe(cluster, *args, cluster.gcs_address, env={"RAY_AUTH_TOKEN": value})
    away = outside(cluster, *args, cluster.client_address, RAY_AUTH_TOKEN=value, HOME=str(tmp_path))
    for done, address in ((on_node, cluster.gcs_address), (away, cluster.client_address)):
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [want.format(address)]
    assert listed("s3://out/token/") == listed("s3://work/token/") == []


@pytest.mark.parametrize(
    ("option", "args"),
    [
        ("INPUT", ["/tmp/planted/RGB.byte.tif", "--model", MODEL, "--work-dir", "s3://work/planted"]),
        ("--model", [SCENE, "--model", "/tmp/planted/rgb.safetensors", "--work-dir", "s3://work/planted"]),
        ("--work-dir", [SCENE, "--model", MODEL, "--work-dir", "/tmp/planted/work"]),
        ("--work-dir", [SCENE, "--model", MODEL]),  # none: the driver's temporary folder holds the work store
    ],
    ids=["input", "model", "work-dir", "no-work-dir"],
)
def test_paths_only_the_driver_sees_are_refused_before_work_starts(
    cluster: NetnsCluster, rgb_checkpoint: Path, option: str, args: list[str]
) -> None:
    """The scene and the model planted on the head's disk only: the driver (on the head) reads them, the worker
    could not; the run stops before any work with one line naming the option."""
    for source in (DATA / "RGB.byte.tif", rgb_checkpoint, rgb_checkpoint.with_suffix(".json")):
        cluster.put(cluster.head, source, f"/tmp/planted/{source.name}")
    assert not cluster.files(cluster.workers[0], "/tmp/planted")
    done = segpipe(cluster, "run", args[0], "s3://out/planted/mask.tif", *args[1:], "--tile-size", "64",
                   "--no-prefect", "--ray-address", cluster.gcs_address)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: on a Ray cluster of several machines, {option} must be on object storage (s3://, gs://, az://) that "
        "every node reads; the other machines cannot see this machine's files (see docs/cluster.md)"
    ]
    assert listed("s3://out/planted/") == listed("s3://work/planted/") == []
    assert not cluster.files(cluster.head, "/tmp/planted/work/*"), "no work store on the driver's disk either"


def test_declared_gpus_get_one_segmenter_each_and_the_cpu_nodes_none(cluster: NetnsCluster) -> None:
    """Two more nodes started with ``--num-gpus 1`` (declared: there is no GPU here). The pool a run plans on this
    cluster: one segmenter per GPU, each pinned by Ray to its node's GPU 0; none on the CPU-only head and worker
    (``_placement.py`` loads the model on the CPU: see its docstring). A plain run resolves ``--device auto`` to
    ``cuda``, and the GPU nodes' segmenters say in one line that their torch has no CUDA."""
    added = [cluster.add_node(name, cpus=1, gpus=1) for name in ("gpu1", "gpu2")]
    try:
        cluster.wait_for_nodes()
        placement = [sys.executable, str(Path(__file__).with_name("_placement.py")), cluster.gcs_address, MODEL]
        done = cluster.run(cluster.head, placement, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        placed = json.loads(done.stdout.strip().splitlines()[-1])
        assert placed["device"] == "cuda" and placed["workers"] == 2 and placed["resources"]["num_gpus"] == 1
        names = cluster.node_ids()
        held = collections.Counter(names[s["node"]] for s in placed["segmenters"])
        assert held == {"gpu1": 1, "gpu2": 1}, f"one segmenter per GPU node, none on head or worker1: {held}"
        for segmenter in placed["segmenters"]:
            assert segmenter["gpu_ids"] == ["0"] and segmenter["cuda_visible_devices"] == "0", segmenter
            assert segmenter["device"] == "cpu", segmenter

        run = segpipe(cluster, "run", SCENE, *outputs("gpu"), *OPTIONS, "--ray-address", cluster.gcs_address)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip().splitlines() == [
            "error: device 'cuda' was requested but this machine has no usable CUDA GPU; use 'cpu'"
        ]
    finally:
        for node in added:
            cluster.remove_node(node)
    cluster.wait_for_nodes()


def test_the_worker_lost_mid_run_the_run_finishes_on_the_head_with_the_same_bytes(
    cluster: NetnsCluster, reference: dict[str, str]
) -> None:
    """The worker's raylet is SIGKILLed while tiles are being computed (the machine is gone for the cluster): its
    segmenter's unfinished tiles go to the head's, and mask and probabilities are byte-identical to the
    reference. The worker is started again afterwards."""
    from segpipe.pipeline import store as ws

    worker = cluster.workers[0]
    store_url = ws.store_url("s3://work/lost", SCENE)
    argv = [SEGPIPE, "run", SCENE, *outputs("lost"), *OPTIONS, "--batch-size", "4", "--json"]
    run = cluster.popen(cluster.head, [*argv, "--ray-address", cluster.gcs_address], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_until(lambda: done_tiles(store_url) >= 16 or run.poll() is not None, timeout=300, what="16 tiles done")
        assert run.poll() is None, "the run ended before the worker could be lost"
        cluster.kill_raylet(worker)
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        cluster.restart(worker)
    summary = summary_of(subprocess.CompletedProcess(run.args, run.returncode, out, err))
    assert sha256("s3://out/lost/mask.tif") == reference["mask"]
    assert sha256("s3://out/lost/probabilities.tif") == reference["probabilities"]
    tiles = tiles_by_node(cluster, summary)
    assert tiles.get("head", 0) > 0 and summary["tiles"]["computed"] == sum(tiles.values()) > 16, tiles
    cluster.wait_for_nodes()


# --- a night ---------------------------------------------------------------------------------------------------


def deployable(cluster: NetnsCluster, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The repository's prefect.yaml, its parameters pointed at the night's S3 folders, the model on S3 and the
    head's GCS (the worker runs on the head, a Ray node), its pull step at this checkout."""
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    config["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    (deployment,) = config["deployments"]
    options = {"model": MODEL, "work_dir": "s3://work/night/", "ray_address": cluster.gcs_address, "tile_size": 128}
    deployment["parameters"] = {"source": "s3://scenes/night/", "output_dir": "s3://out/night/", "options": options}
    copy = folder / "prefect.yaml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy, deployment


def test_a_night_on_the_cluster_through_a_prefect_server_and_a_worker_on_the_head(
    cluster: NetnsCluster, tmp_path: Path
) -> None:
    """prefect.yaml deployed from this machine to a ``prefect server`` on the head; a process worker on the head
    runs the triggered night: a folder of real scenes on S3, segmented on both nodes, Items and a Collection beside
    the masks. The second night skips both scenes and rewrites no mask."""
    from tests.flows.test_prefect_deploy import api_get, prefect, stop_group, tail

    objects.upload_file(DATA / "RGB.byte.tif", "s3://scenes/night/a.tif")
    objects.upload_file(DATA / "lausanne-1091-322_00.tif", "s3://scenes/night/b.tif")
    copy, deployment = deployable(cluster, tmp_path)
    pool, name = deployment["work_pool"]["name"], f"segment_dataset/{deployment['name']}"
    api = f"http://{cluster.head.ip}:4200/api"
    operator = cluster.outside_env(PREFECT_API_URL=api, PREFECT_HOME=str(tmp_path / "prefect"), COLUMNS="250")
    with (tmp_path / "server.log").open("wb") as log:
        server = cluster.popen(
            cluster.head,
            [str(BIN / "prefect"), "server", "start", "--host", cluster.head.ip, "--port", "4200"],
            env={"PREFECT_HOME": "/tmp/prefect-server"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def night(k: int) -> list[dict[str, Any]]:
        """Trigger the deployment, run one worker on the head until the flow run ends; the night's table."""
        run_id = prefect(operator, "deployment", "run", name).stdout.split("UUID:")[1].split()[0].strip()
        log_path = tmp_path / f"worker{k}.log"
        with log_path.open("wb") as log:
            worker = cluster.popen(
                cluster.head,
                [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"],
                env={"PREFECT_API_URL": api, "PREFECT_HOME": "/tmp/prefect-worker", "PREFECT_LOGGING_LEVEL": "INFO"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            ended = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
            wait_until(lambda: (api_get(f"{api}/flow_runs/{run_id}") or {}).get("state_type") in ended,
                       timeout=480, what=f"night {k}'s flow run to end")  # fmt: skip
            assert worker.wait(timeout=120) == 0, tail(log_path)
        finally:
            stop_group(worker)
        state = api_get(f"{api}/flow_runs/{run_id}")
        assert state["state_type"] == "COMPLETED", f"{state['state']}\n{tail(log_path)}"
        table = api_get(f"{api}/artifacts/segpipe-night/latest")["data"]
        return list(json.loads(table) if isinstance(table, str) else table)

    try:
        wait_until(lambda: api_get(f"{api}/health") is True or server.poll() is not None, timeout=180,
                   what="the Prefect server on the head")  # fmt: skip
        assert server.poll() is None, tail(tmp_path / "server.log")
        prefect(operator, "work-pool", "create", pool, "--type", "process")
        prefect(operator, "--no-prompt", "deploy", "--all", "--prefect-file", str(copy))

        first = night(1)
        assert [(row["scene"], row["status"]) for row in first] == [("a", "done"), ("b", "done")], first
        collection = json.loads(objects.read_bytes("s3://out/night/collection.json"))
        items = sorted(link["href"] for link in collection["links"] if link["rel"] == "item")
        assert items == ["./a.item.json", "./b.item.json"]
        tiles: collections.Counter[str] = collections.Counter()
        for scene in ("a", "b"):
            summary = json.loads(objects.read_bytes(f"s3://out/night/{scene}.mask.summary.json"))
            tiles.update(tiles_by_node(cluster, summary))
        assert set(tiles) == {"head", "worker1"} and min(tiles.values()) > 0, tiles
        etags = {scene: objects.head(f"s3://out/night/{scene}.mask.tif")["e_tag"] for scene in ("a", "b")}

        second = night(2)
        skipped = [(row["scene"], row["status"], row["reason"]) for row in second]
        assert skipped == [("a", "skipped", "unchanged"), ("b", "skipped", "unchanged")], second
        assert {scene: objects.head(f"s3://out/night/{scene}.mask.tif")["e_tag"] for scene in ("a", "b")} == etags
    finally:
        stop_group(server)
