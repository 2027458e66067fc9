"""No process outlives its run, however the run ends, and a cluster that cannot be reached is one clear line.

Each test starts ``segpipe run`` through Prefect (its temporary API server) on a local Ray instance (GCS, raylet,
agents, a segmenter actor), notes every process the command started, ends the run one way or another, and checks
that none of them is left."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.reliability.helpers import rgb_scene, subprocess_env, wait_for

TIMEOUT = 180


def start(tmp_path: Path, checkpoint: Path, *extra: str) -> subprocess.Popen[str]:
    scene = rgb_scene(tmp_path / "scene.tif", 384, 384)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segpipe.cli",
            "run",
            str(scene),
            str(tmp_path / "mask.tif"),
            "--model",
            str(checkpoint),
            "--tile-size",
            "64",
            "--halo",
            "16",
            "--batch-size",
            "2",
            "--executor",
            "ray",
            *extra,
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def started_services(run: subprocess.Popen[str]) -> list[psutil.Process]:
    """The run's descendants once its segmenter works (Prefect's server and Ray's processes among them)."""

    def ready() -> list[psutil.Process] | None:
        found = psutil.Process(run.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in found if p.is_running())
        return found if "TileSegmenter" in names and "uvicorn" in names else None

    return wait_for(ready, timeout=TIMEOUT, what="Prefect's server and a Ray segmenter", interval=0.2)


def assert_all_gone(processes: list[psutil.Process], timeout: float = 30) -> None:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    left = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in alive if p.is_running()]
    for p in alive:  # do not leave them to the next test
        p.kill()
    assert not left, "still running after the run:\n" + "\n".join(left)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_leaves_no_process(sig: signal.Signals, tmp_path: Path, slow_checkpoint: Path) -> None:
    run = start(tmp_path, slow_checkpoint)
    services = started_services(run)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=TIMEOUT)
    if sig == signal.SIGTERM:
        assert run.returncode == 143, stderr
        lines = stderr.strip().splitlines()
        assert lines[-1] == "error: terminated; re-run with the same --work-dir to resume", stderr
    else:
        assert run.returncode == -signal.SIGKILL
    assert_all_gone(services)
    assert not (tmp_path / "mask.tif").exists()


def test_a_run_whose_ray_node_dies_fails_and_leaves_no_process(tmp_path: Path, slow_checkpoint: Path) -> None:
    """The node dies as a machine does, its raylet and every process it started (the segmenter among them) at
    once. (A raylet killed alone leaves its segmenter computing: direct actor calls need no raylet, and a run
    whose segmenter finishes every tile before it learns of its raylet's death rightly succeeds.)"""
    run = start(tmp_path, slow_checkpoint)
    services = started_services(run)
    raylet = next(p for p in services if p.name() == "raylet" or "raylet" in " ".join(p.cmdline()[:1]))
    node = [raylet, *raylet.children(recursive=True)]
    assert any("TileSegmenter" in " ".join(p.cmdline()) for p in node), "the segmenter runs under the raylet"
    for process in node:
        process.kill()
    try:
        stdout, stderr = run.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        pytest.fail("the run hung after its Ray node died")
    assert run.returncode != 0, f"the run finished although its Ray node died:\n{stdout}\n{stderr}"
    assert "no live Ray node can start a segmenter" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert_all_gone(services)


def test_an_address_that_is_not_a_ray_cluster_is_one_line_within_the_timeout(
    tmp_path: Path, rgb_checkpoint: Path
) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never speaks Ray's protocol
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        began = time.monotonic()
        run = start(tmp_path, rgb_checkpoint, "--ray-address", address, "--ray-connect-timeout", "3", "--no-prefect")
        _, stderr = run.communicate(timeout=TIMEOUT)
        took = time.monotonic() - began
    finally:
        listener.close()
    assert run.returncode == 2, stderr
    assert stderr.strip().splitlines() == [
        f"error: the Ray cluster at {address} did not answer within 3 s; check --ray-address, the cluster and its "
        "authentication token (--ray-connect-timeout waits longer)"
    ]
    assert took < 30, took
