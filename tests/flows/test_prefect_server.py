"""The nightly deployment on a real Prefect server on 127.0.0.1: ``segpipe serve`` registers it with its cron schedule
and time zone, ``prefect deployment ls`` lists it (the pinned fastapi and SQLAlchemy), a triggered run completes
and leaves its artifacts and outputs, and the served process ends cleanly on SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
TIMEOUT = 240


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[dict[str, str]]:
    """``prefect server start`` on 127.0.0.1 with its own home (database); yields the environment that points at it."""
    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    process = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait(lambda: _get(f"{env['PREFECT_API_URL']}/health") == "true", "Prefect's server to start")
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return str(answer.read().decode())
    except OSError:
        return None


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def wait(condition: Any, what: str, timeout: float = TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    wide = {**env, "COLUMNS": "250"}  # rich tables: no cut names
    return subprocess.run([str(BIN / "prefect"), *args], env=wide, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(900)
def test_serve_registers_the_nightly_deployment_and_a_triggered_run_completes(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scenes = tmp_path / "in"
    scenes.mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", scenes / "a.tif")
    shutil.copy(data_dir / "lausanne-1091-322_00.tif", scenes / "b.tif")
    out = tmp_path / "out"
    with prefect_server(tmp_path / "prefect") as env:
        api = env["PREFECT_API_URL"]
        serve = subprocess.Popen(
            [
                sys.executable, "-m", "segpipe.cli", "serve", str(scenes), str(out), "--model", str(rgb_checkpoint),
                "--executor", "local", "--tile-size", "64", "--halo", "16", "--cron", "30 1 * * *",
                "--timezone", "Europe/Zurich", "--name", "nightly",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:

            def listed() -> bool:
                found = prefect(env, "deployment", "ls")
                return found.returncode == 0 and "segment_dataset/nightly" in found.stdout

            assert wait(listed, "the deployment to be listed by `prefect deployment ls`")
            (deployment,) = _post(f"{api}/deployments/filter", {"deployments": {"name": {"any_": ["nightly"]}}})
            (schedule,) = deployment["schedules"]
            assert schedule["schedule"]["cron"] == "30 1 * * *"
            assert schedule["schedule"]["timezone"] == "Europe/Zurich" and schedule["active"]

            triggered = prefect(env, "deployment", "run", "segment_dataset/nightly")
            assert triggered.returncode == 0, triggered.stderr
            run_id = triggered.stdout.split("UUID:")[1].split()[0].strip()

            def finished() -> dict[str, Any] | None:
                run = json.loads(_get(f"{api}/flow_runs/{run_id}") or "{}")
                return run if run.get("state_type") in ("COMPLETED", "FAILED", "CRASHED") else None

            run = wait(finished, "the triggered run to finish")
            assert run["state_type"] == "COMPLETED", run["state"]
            runs = prefect(env, "flow-run", "ls")
            assert runs.returncode == 0 and "segment_dataset" in runs.stdout, runs.stderr
            keys = {a["key"] for a in _post(f"{api}/artifacts/filter", {})}
            assert {"segpipe-night", "segpipe-night-report", "scene-a", "scene-b"} <= keys, keys
        finally:
            serve.send_signal(signal.SIGTERM)
            _, stderr = serve.communicate(timeout=120)
        assert serve.returncode in (0, 143), stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "a.item.json", "a.mask.summary.json", "a.mask.tif", "b.item.json", "b.mask.summary.json", "b.mask.tif",
        "collection.json", "segpipe-options.json",
    ]  # fmt: skip
