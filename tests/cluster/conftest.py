"""Real servers on 127.0.0.1 for the cluster tests: an S3-compatible server (moto's server mode), a TCP proxy in
front of it to refuse connections on demand, and a Ray cluster of two raylets on this machine (Ray's own multi-node
test harness, ``ray.cluster_utils.Cluster``), all on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Credentials and region for the S3 server (moto accepts any).
S3_ENV = {"AWS_ACCESS_KEY_ID": "segpipe", "AWS_SECRET_ACCESS_KEY": "segpipe-test", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's S3 server on 127.0.0.1 (objects in memory, gone when it stops)."""

    def __init__(self) -> None:
        self.port = free_port()
        moto = Path(sys.executable).with_name("moto_server")
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def bucket(self, name: str, endpoint: str | None = None) -> str:
        """Create a bucket; returns ``s3://name``."""
        request = urllib.request.Request(f"{endpoint or self.url}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``target_port`` (:mod:`tests.cluster.proxy`, its own process):
    :meth:`refuse` closes it (clients get "connection refused"), :meth:`accept` opens it again on the same port."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("proxy.py")), str(self.port), str(target_port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None and self.process.stdout.readline().strip() == "ready"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def refuse(self) -> None:
        self.process.send_signal(signal.SIGUSR1)

    def accept(self) -> None:
        self.process.send_signal(signal.SIGUSR2)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """The AWS variables that point segpipe (obstore and GDAL) at ``endpoint``, set for the block."""
    values = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A fresh S3 server for one test, with the environment pointing at it."""
    server = S3Server()
    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": server.url}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SEGPIPE_CACHE_DIR", tempfile.mkdtemp(prefix="segpipe-cache-"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Two raylets of one CPU each on 127.0.0.1 (Ray's multi-node harness, in a private Ray temp folder), with
    token authentication."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray server on loopback
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # as `ray start --head` in Ray 2.60, and as segpipe connects
    ray_tmp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
