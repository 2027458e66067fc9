"""Security: checkpoints never unpickle; the local Ray keeps token authentication and listens on loopback only,
without a dashboard; Prefect's temporary server listens on loopback; work-store names stay inside --work-dir."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from segpipe.pipeline import store as ws
from tests.reliability.conftest import Cli, assert_refused
from tests.reliability.helpers import REPO, rgb_scene

LOCAL = ("--executor", "local", "--no-prefect")


class Payload:
    """Unpickling this creates the directory ``marker``: proof that a pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def _payloads(folder: Path, marker: Path) -> dict[str, Path]:
    import torch

    sidecar = json.dumps({"architecture": "unet"})
    made = {}
    for name in ("evil.pth", "evil.safetensors", "evil.pt"):
        path = folder / name
        if name.endswith(".pt"):
            torch.save({"state_dict": Payload(marker)}, path)  # a zip of pickles, as torch.save writes
        else:
            path.write_bytes(pickle.dumps(Payload(marker)))
        path.with_suffix(".json").write_text(sidecar)
        made[name] = path
    only = folder / "only-a-pickle"
    only.mkdir()
    (only / "model.ckpt").write_bytes(pickle.dumps(Payload(marker)))
    made["directory"] = only
    return made


REFUSAL = (
    "; segpipe never unpickles (unpickling can run arbitrary code) and accepts only safetensors, ONNX or TorchScript "
    "files with a JSON sidecar. Convert it once in a trusted environment: load it there and call "
    "segpipe.models.checkpoint.save_checkpoint(module, metadata, 'model.safetensors')"
)


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("evil.pth", "a pickle-based checkpoint"),
        ("evil.safetensors", "a pickle"),
        ("evil.pt", "a zip of pickles (torch.save output)"),
        ("directory", "a pickle-based checkpoint"),
    ],
)
def test_pickle_model_is_refused_and_not_executed(name: str, what: str, cli: Cli, tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    path = _payloads(tmp_path, marker)[name]
    (tmp_path / "out").mkdir()
    scene = rgb_scene(tmp_path / "scene.tif", 32, 32)
    result = cli("run", scene, tmp_path / "out" / "m.tif", "--model", path, *LOCAL)
    shown = {
        "evil.pth": str(path),
        "directory": str(path / "model.ckpt"),
    }.get(name, str(path.resolve()))
    assert_refused(result, f"model file {shown} is {what}{REFUSAL}", tmp_path / "out")
    assert not marker.exists(), "the pickle was executed"


def test_a_valid_checkpoint_loads_without_pickle(rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from segpipe.models.checkpoint import load_model

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load reached pickle")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    assert load_model(rgb_checkpoint).metadata.bands == ("red", "green", "blue")


RAY_PROBE = """
import json, psutil
from segpipe.pipeline.ray_start import ray_session
with ray_session(None, 1) as ray:
    from ray._private.authentication.authentication_utils import is_token_auth_enabled
    from ray._raylet import AuthenticationTokenLoader
    import os
    node = ray._private.worker.global_worker.node
    listening = set()
    for child in psutil.Process().children(recursive=True):
        try:
            listening |= {(c.laddr.ip, c.laddr.port) for c in child.net_connections("inet") if c.status == "LISTEN"}
        except psutil.Error:
            pass
    print(json.dumps({
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "token_auth": is_token_auth_enabled(),
        "has_token": AuthenticationTokenLoader.instance().has_token(),
        "node_ip": node.node_ip_address,
        "gcs": node.gcs_address,
        "webui": node.address_info.get("webui_url"),
        "listening": sorted(listening),
    }))
"""


def test_local_ray_has_token_auth_listens_on_loopback_and_has_no_dashboard(tmp_path: Path) -> None:
    """In a fresh process with Ray's settings at their defaults, as `segpipe run` starts it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_AUTH", "RAY_ADDRESS")) and k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    }
    result = subprocess.run(
        [sys.executable, "-c", RAY_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout.strip().splitlines()[-1])
    assert facts["auth_mode"] == "token" and facts["token_auth"] is True and facts["has_token"] is True, facts
    assert facts["node_ip"] == "127.0.0.1" and facts["gcs"].startswith("127.0.0.1:"), facts
    assert not facts["webui"], "no dashboard"
    assert facts["listening"], "found Ray's servers"
    exposed = [(ip, port) for ip, port in facts["listening"] if ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == [], f"Ray listens beyond loopback: {exposed}"
    assert 8265 not in {port for _, port in facts["listening"]}, "the dashboard's port"


def test_prefect_temporary_server_listens_on_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ephemeral API the flows use without PREFECT_API_URL is uvicorn started with --host 127.0.0.1; the
    settings for a real server and a runner webserver default to loopback too (none is started here)."""
    from prefect.server.api import server as prefect_server
    from prefect.settings import Settings

    for name in ("PREFECT_SERVER_API_HOST", "PREFECT_RUNNER_SERVER_HOST", "PREFECT_RUNNER_SERVER_ENABLE"):
        monkeypatch.delenv(name, raising=False)
    started: list[list[str]] = []

    class FakePopen:
        def __init__(self, args: list[str], **kwargs: object) -> None:
            started.append(list(args))

    monkeypatch.setattr(prefect_server.subprocess, "Popen", FakePopen)
    ephemeral = prefect_server.SubprocessASGIServer(port=8765)
    ephemeral._run_uvicorn_command()
    host = started[0][started[0].index("--host") + 1]
    assert host == "127.0.0.1" and ephemeral.address == "http://127.0.0.1:8765"
    settings = Settings()
    assert settings.server.api.host == "127.0.0.1"
    assert settings.runner.server.host == "localhost" and settings.runner.server.enable is False


def _auth_mode_set_to(tree: ast.AST) -> list[str]:
    """The values our code gives ``RAY_AUTH_MODE`` (``environ["RAY_AUTH_MODE"] = v``, ``setdefault``, ``putenv``,
    ``update``): reading it, or naming it in a message, sets nothing."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and ast.unparse(target.slice) == "'RAY_AUTH_MODE'":
                    found.append(ast.unparse(node.value))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            args = [ast.unparse(a) for a in node.args]
            if node.func.attr in ("setdefault", "putenv") and args[:1] == ["'RAY_AUTH_MODE'"]:
                found.append(args[1] if len(args) > 1 else "?")
            if node.func.attr == "update":
                found += [ast.unparse(k.value) for k in node.keywords if k.arg == "RAY_AUTH_MODE"]
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        found += [
                            ast.unparse(v) for k, v in zip(arg.keys, arg.values, strict=True)
                            if k is not None and ast.unparse(k) == "'RAY_AUTH_MODE'"
                        ]  # fmt: skip
    return found


def test_project_code_never_opens_up_ray_or_prefect() -> None:
    """No code of ours binds all interfaces or turns Ray's authentication off: the only value it ever gives
    RAY_AUTH_MODE is ``token`` (for a cluster given by address)."""
    offenders = []
    for folder in ("pipeline", "flows", "segpipe", "models"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("0.0.0.0", "PREFECT_SERVER_API_HOST", "include_dashboard=True"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
            for value in _auth_mode_set_to(ast.parse(text)):
                if value != "'token'":
                    offenders.append(f"{path.relative_to(REPO)}: RAY_AUTH_MODE = {value}")
    assert offenders == []
    planted = "import os\nos.environ.setdefault('RAY_AUTH_MODE', 'token')\nos.environ['RAY_AUTH_MODE'] = 'disabled'\n"
    assert sorted(_auth_mode_set_to(ast.parse(planted))) == ["'disabled'", "'token'"], "the check finds a value given"


def test_an_input_named_with_dotdot_keeps_its_work_store_in_the_work_dir(
    cli: Cli, tmp_path: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    rgb_scene(tmp_path / "x.tif", 40, 30)
    monkeypatch.chdir(deep)
    assert cli("run", "../../x.tif", "m.tif", "--model", rgb_checkpoint, "--work-dir", "work", *LOCAL).code == 0
    assert [p.name for p in (deep / "work").iterdir()] == [Path(ws.store_url("work", "../../x.tif")).name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "locks", "x.tif"]


SESSION_PROBE = """
import json
from segpipe.pipeline.ray_start import ray_session
with ray_session(None, 1) as ray:
    print(json.dumps({"gcs": ray._private.worker.global_worker.node.gcs_address}))
"""


def test_a_ray_already_running_on_the_machine_is_left_alone() -> None:
    """A user's own `ray start --head` must neither break a run nor be joined by it without --ray-address.

    `ray start --head` records its address in `<RAY_TMPDIR>/ray/ray_current_cluster`, and a bare `ray.init()` reads
    that record, tries to join, and refuses `num_cpus`. The test writes the same record (for an address nothing
    listens on) in a private Ray temp dir instead of starting a real head: same trigger, no second cluster on a
    2-core CI machine, and no `ray stop` that would kill other Ray processes.
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="sp", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        record = ray_tmp / "ray" / "ray_current_cluster"
        record.parent.mkdir()
        record.write_text("127.0.0.1:1")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=str(ray_tmp))
        probe = subprocess.run(
            [sys.executable, "-c", SESSION_PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
        assert probe.returncode == 0, probe.stderr
        gcs = json.loads(probe.stdout.strip().splitlines()[-1])["gcs"]
        assert gcs != "127.0.0.1:1", "joined the recorded cluster instead of starting its own"
        assert record.read_text() == "127.0.0.1:1", "the user's cluster record was changed"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
