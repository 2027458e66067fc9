"""Prefect's temporary API server for one ``segpipe`` command, started before anything else so that it comes up while
the run validates its input and loads its model.

Without ``PREFECT_API_URL``, Prefect starts the same server itself (its "ephemeral" mode) when the first flow begins,
after importing its server package in the calling process (about 2 s of Python that competes with the run's own
imports). Here the server process is started at once, with the settings Prefect's ephemeral mode gives it (UI off,
ephemeral database and services), and ``PREFECT_API_URL`` points the command's Prefect client at it, so the client
never imports the server. The server listens on 127.0.0.1 only and is stopped when the command ends (and by the
reaper, :mod:`segpipe.cli.reaper`, if the command is killed).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


class TemporaryServer:
    """A Prefect API server on a free port of 127.0.0.1; :meth:`wait` blocks until it answers."""

    def __init__(self) -> None:
        with contextlib.closing(socket.socket()) as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        spec = importlib.util.find_spec("prefect")
        if spec is None or spec.origin is None:
            raise RuntimeError("prefect is not installed")
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn",
                "--app-dir", str(Path(spec.origin).parent.parent),
                "--factory", "prefect.server.api.server:create_app",
                "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "error", "--lifespan", "on",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, timeout: float) -> None:
        """Block until the server answers its health check.

        Raises:
            RuntimeError: it exited or did not answer within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary API server exited with code {self.process.returncode}")
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"Prefect's temporary API server did not answer within {timeout:g} s")

    def stop(self) -> None:
        """End the server now (its database is Prefect's local one; nothing is lost)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@contextlib.contextmanager
def temporary_server() -> Iterator[TemporaryServer | None]:
    """Start a temporary server unless ``PREFECT_API_URL`` names one, and point this process's Prefect at it; it is
    stopped when the process exits (yields None when a server was configured)."""
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = TemporaryServer()
    # at exit, after Prefect's own exit handlers (registered later, run earlier) have sent their last events to it
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    # its logs go with it when the command ends, and the last batch, sent at exit, would fail once it has stopped
    os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
    yield server
