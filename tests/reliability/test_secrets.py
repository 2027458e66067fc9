"""Secrets never appear in what segpipe writes or says: a night on a real Prefect server, with recognisable secrets
in the environment and a webhook whose path is its secret, leaves none in its outputs, work store, Prefect
artifacts and logs, the webhook's body, or the command's output. Plus the redaction rules, property-tested."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from segpipe.core.secrets import MASK, host_of, redact, redact_tree
from tests.flows.test_prefect_server import BIN, _post, prefect_server

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "SECRETawsKEY0123456789",
    "AWS_SESSION_TOKEN": "SECRETsessionTOKEN98765",
    "RAY_AUTH_TOKEN": "SECRETrayTOKEN55555",
}
HOOK_SECRET = "SECREThookPATH4242"


class Hook(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        Hook.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _everything_under(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


@pytest.mark.timeout(600)
def test_a_night_with_secrets_around_leaks_none(data_dir: Path, rgb_checkpoint: Path, tmp_path: Path) -> None:
    scenes, out, work = tmp_path / "in", tmp_path / "out", tmp_path / "work"
    scenes.mkdir()
    shutil.copy(data_dir / "RGB.byte.tif", scenes / "good.tif")
    (scenes / "broken.tif").write_bytes((data_dir / "RGB.byte.tif").read_bytes()[:5000])  # fails: notify fires
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{hook.server_address[1]}/hooks/{HOOK_SECRET}"
    try:
        with prefect_server(tmp_path / "prefect") as env:
            night = subprocess.run(
                [str(BIN / "segpipe"), "dataset", str(scenes), str(out), "--model", str(rgb_checkpoint),
                 "--work-dir", str(work), "--executor", "local", "--tile-size", "128", "--retries", "0"],
                env={**env, **SECRETS, "SEGPIPE_NOTIFY_URL": url}, capture_output=True, text=True, timeout=480,
            )  # fmt: skip
            assert night.returncode == 2, night.stderr
            api = env["PREFECT_API_URL"]
            prefect_records = json.dumps([_post(f"{api}/{kind}/filter", {}) for kind in ("artifacts", "logs")])
            runs = json.dumps(_post(f"{api}/flow_runs/filter", {}))
    finally:
        hook.shutdown()
    assert (out / "good.mask.tif").is_file() and Hook.bodies, "the night ran and the webhook heard of the failure"
    assert "broken" in night.stderr and "good" in prefect_records
    texts = {
        "stdout and stderr": night.stdout + night.stderr,
        "outputs": _everything_under(out).decode("latin-1"),
        "work store": _everything_under(work).decode("latin-1"),
        "Prefect artifacts and logs": prefect_records,
        "Prefect flow runs (parameters)": runs,
        "the webhook's body": b"".join(Hook.bodies).decode(),
    }
    for secret in [*SECRETS.values(), HOOK_SECRET]:
        for where, text in texts.items():
            assert secret not in text, f"{secret} found in {where}"


def test_a_failing_webhook_is_logged_by_its_host_only() -> None:
    from segpipe.core import notify

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    notify.log.addHandler(handler)
    try:
        notify.post_report(f"http://127.0.0.1:9/hooks/{HOOK_SECRET}", {"failed": {"a": "x"}})  # port 9: nobody
    finally:
        notify.log.removeHandler(handler)
    assert said and said[0].startswith("could not notify http://127.0.0.1:9") and HOOK_SECRET not in said[0]


def test_the_cli_redacts_its_error_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "segpipe.cli", "run", "https://user:pa55word@127.0.0.1:9/a.tif?X-Amz-Signature=abc123",
         str(tmp_path / "m.tif"), "--no-prefect"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "pa55word" not in done.stderr and "abc123" not in done.stderr and f"user:{MASK}@" in done.stderr


def test_redaction_rules() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "averysecretvalue", "RAY_AUTH_TOKEN": "short"}
    assert redact("s3 key averysecretvalue here", env) == f"s3 key {MASK} here"
    assert redact("token short", env) == "token short"  # too short to be told from ordinary text
    assert (
        redact("https://u:p@h/x?a=1&X-Amz-Signature=deadbeef&b=2", {})
        == f"https://u:{MASK}@h/x?a=1&X-Amz-Signature={MASK}&b=2"
    )
    assert redact("https://h/x.tif?sv=1&sig=abc%2F&se=2", {}) == f"https://h/x.tif?sv=1&sig={MASK}&se=2"
    assert redact("/data/a.tif and s3://bucket/b.tif", {}) == "/data/a.tif and s3://bucket/b.tif"
    assert redact_tree({"url": "https://u:p@h", "list": ["x?token=t1"]}, {}) == {
        "url": f"https://u:{MASK}@h", "list": [f"x?token={MASK}"],
    }  # fmt: skip
    assert host_of("https://hooks.example/services/T0/B0/XYZ") == "https://hooks.example"


@given(
    st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122), min_size=8, max_size=40), st.text(max_size=60)
)
def test_a_secret_environment_value_never_survives(secret: str, around: str) -> None:
    env = {"RAY_AUTH_TOKEN": secret}
    redacted = redact(around + secret + around, env)
    assert secret not in redacted and MASK in redacted


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._-", min_size=1, max_size=40))
def test_text_without_secrets_is_unchanged(path: str) -> None:
    assert redact(f"s3://bucket/{path}", {}) == f"s3://bucket/{path}"
