"""Segmenters that die while they start: killed in ``__init__`` (loading torch and the model) once or twice, they
are replaced and the pool comes up; killed every time, the start fails with one line; a
model that cannot be loaded fails with the model's own error, not a Ray traceback. Real Ray, real SIGKILLs."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from segpipe.core.errors import ModelError
from segpipe.pipeline import pool as pools
from segpipe.pipeline.infer import ModelSpec
from segpipe.pipeline.session import Session
from tests.reliability.conftest import Cli
from tests.reliability.helpers import rgb_scene

TIMEOUT = 180.0  # seconds: a loaded 2-core machine


def _titled(prefix: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith(prefix):
                found.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _killer(prefix: str, times: int, stop: threading.Event, killed: list[int]) -> Callable[[], None]:
    """Kill the first ``times`` processes titled ``prefix`` (polling every 10 ms until ``stop``)."""

    def run() -> None:
        deadline = time.monotonic() + TIMEOUT
        while not stop.is_set() and len(killed) < times and time.monotonic() < deadline:
            for proc in _titled(prefix):
                if proc.pid not in killed:
                    proc.send_signal(signal.SIGKILL)
                    killed.append(proc.pid)
            time.sleep(0.01)

    return run


def _start_with_kills(prefix: str, times: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    monkeypatch.setattr(pools, "START_BACKOFF_S", 0.1)
    stop, killed = threading.Event(), []
    thread = threading.Thread(target=_killer(prefix, times, stop, killed), daemon=True)
    with Session(ray=True, num_cpus=2) as session:
        thread.start()
        try:
            pool = session.segmenters(ModelSpec("null", None, "cpu", 1), 1, {"num_cpus": 1})
            answer = session.ray.get(pool.actors[0].ping.remote())
        finally:
            stop.set()
            thread.join()
    return answer, killed


@pytest.mark.parametrize("kills", [1, 2])
def test_a_segmenter_killed_while_starting_is_replaced(kills: int, monkeypatch: pytest.MonkeyPatch) -> None:
    answer, killed = _start_with_kills("ray::TileSegmenter.__init__", kills, monkeypatch)
    assert len(killed) == kills
    assert answer.startswith("cpu@")
    assert killed[0] not in [p.pid for p in _titled("ray::")]


def test_a_segmenter_killed_at_every_start_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"a segmenter died while starting, 3 times; last: ") as caught:
        _start_with_kills("ray::TileSegmenter.__init__", 100, monkeypatch)
    assert "\n" not in str(caught.value)


def test_a_model_that_fails_to_load_in_the_segmenter_gives_its_own_error() -> None:
    with Session(ray=True, num_cpus=1) as session, pytest.raises(ModelError, match="but the run was planned with"):
        session.segmenters(ModelSpec("null", "0" * 64, "cpu", 1), 1, {"num_cpus": 1})
    assert not _titled("ray::TileSegmenter")


def test_cli_run_whose_segmenter_is_killed_at_start_finishes(cli: Cli, tmp_path: Path) -> None:
    scene = rgb_scene(tmp_path / "scene.tif", 160, 128)
    stop, killed = threading.Event(), []
    thread = threading.Thread(target=_killer("ray::TileSegmenter.__init__", 1, stop, killed), daemon=True)
    thread.start()
    try:
        result = cli("run", str(scene), str(tmp_path / "mask.tif"), "--executor", "ray", "--no-prefect")
    finally:
        stop.set()
        thread.join()
    assert result.code == 0, result.err
    assert killed and (tmp_path / "mask.tif").is_file()
