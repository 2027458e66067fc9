"""The repository's ``prefect.yaml`` deployed for real: a ``prefect server start`` on 127.0.0.1, a process work pool,
``prefect deploy --all`` (no prompts) from a copy of the file whose parameters point at a small scene and model in a
temporary folder, a triggered run picked up by ``prefect worker start --run-once``, and the mask on disk. Every
process the test starts is stopped by its process group id, whatever happens, and none is left behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.conftest import free_port
from tests.reliability.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT = 180.0


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group is still there (zombies of our own children excepted: waited)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process of the group changed its user
        return True
    return True


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group the test started (``start_new_session``), SIGKILL after 20 s; then wait until
    no process of that group remains."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 20
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if group_alive(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session (its group id is its pid), output to ``log``; stopped with its group on exit."""
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_group(process)


def api_get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())
    except (OSError, ValueError):
        return None


def prefect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def deployable_copy(folder: Path, scenes: Path, out: Path, model: Path) -> tuple[Path, dict[str, Any]]:
    """The repository's prefect.yaml with its parameters pointed at ``folder`` and its pull step at this checkout
    (instead of the image's /opt/segpipe); everything else as the file has it."""
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    config["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    (deployment,) = config["deployments"]
    parameters = deployment["parameters"]
    parameters["source"], parameters["output_dir"] = str(scenes), str(out)
    parameters["options"] = {
        "model": str(model),
        "work_dir": str(folder / "work"),
        "executor": "local",  # in the flow run's process: no Ray here
        "tile_size": 256,
        "halo": 16,
    }
    copy = folder / "prefect.yaml"
    copy.write_text(yaml.safe_dump(config, sort_keys=False))
    return copy, deployment


@pytest.mark.timeout(600)
def test_prefect_yaml_deploys_and_a_process_worker_runs_the_night(
    data_dir: Path, rgb_checkpoint: Path, tmp_path: Path
) -> None:
    scenes, out = tmp_path / "in", tmp_path / "out"
    scenes.mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", scenes / "a.tif")
    copy, deployment = deployable_copy(tmp_path, scenes, out, rgb_checkpoint)
    pool = deployment["work_pool"]["name"]
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "COLUMNS": "250",
    }
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    server_argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    with started(server_argv, server_env, server_log) as server:
        try:
            wait_for(
                lambda: api_get(f"{api}/health") is True,
                timeout=TIMEOUT,
                what="the Prefect server to answer",
                interval=0.25,
            )
        except AssertionError:
            pytest.fail(f"the Prefect server did not start:\n{tail(server_log)}")
        prefect(env, "work-pool", "create", pool, "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(copy))

        name = f"segment_dataset/{deployment['name']}"
        registered = api_get(f"{api}/deployments/name/{name}")
        assert registered, f"{name} is not on the server"
        assert registered["entrypoint"] == "flows/dataset.py:segment_dataset"
        assert registered["work_pool_name"] == pool
        assert registered["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        assert registered["parameters"] == deployment["parameters"]
        (schedule,) = registered["schedules"]
        (declared,) = deployment["schedules"]
        assert schedule["schedule"]["cron"] == declared["cron"]
        assert schedule["schedule"]["timezone"] == declared["timezone"] and schedule["active"]

        triggered = prefect(env, "deployment", "run", name)
        run_id = triggered.stdout.split("UUID:")[1].split()[0].strip()
        worker_argv = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"]
        with started(worker_argv, env, worker_log) as worker:

            def finished() -> dict[str, Any] | None:
                run = api_get(f"{api}/flow_runs/{run_id}") or {}
                return run if run.get("state_type") in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            try:
                run = wait_for(finished, timeout=TIMEOUT, what="the triggered flow run to finish", interval=0.25)
            except AssertionError:
                pytest.fail(f"the flow run did not finish; the worker said:\n{tail(worker_log)}")
            assert run["state_type"] == "COMPLETED", f"{run['state']}\n{tail(worker_log)}"
            assert worker.wait(timeout=TIMEOUT) == 0, tail(worker_log)
            assert wait_for(
                lambda: not group_alive(worker.pid), timeout=30, what="the worker's flow-run process to end"
            )
        assert server.poll() is None, "the server stayed up until the test stopped it"
    assert not group_alive(server.pid), "nothing of the server's process group is left"

    assert (out / "a.mask.tif").is_file() and (out / "a.item.json").is_file()
    summary = json.loads((out / "a.mask.summary.json").read_text())
    assert summary["scene"]["width"] > 0
    assert run["parameters"]["options"]["executor"] == "local"
