"""Faults: a segmenter actor killed mid-inference, ``segpipe run`` SIGKILLed during inference and during export, and
two runs racing for the same output or work store. Each run that finishes must give the bytes of a clean run.

Synchronisation is by polling the work store (its ``done`` flags) or a ready file with a timeout, never by sleeping
for a guessed time.
"""

from __future__ import annotations

import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zarr

from segpipe.core.files import partial_path
from segpipe.pipeline import store as ws
from segpipe.pipeline.run import run_scene
from segpipe.pipeline.settings import RunSettings
from tests.reliability.conftest import Cli, assert_refused
from tests.reliability.helpers import rgb_scene, start_segpipe, wait_for

LOCAL = ("--executor", "local", "--no-prefect")
TIMEOUT = 180  # seconds: a loaded 2-core machine; the happy path takes a few


def done_flags(store: Path) -> np.ndarray | None:
    """The store's per-tile ``done`` flags (flat), or None while the store or the array does not exist yet."""
    try:
        group = zarr.open_group(str(store), mode="r")
        if ws.DONE not in group:
            return None
        return np.asarray(group[ws.DONE][...]).ravel()
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None


def alive(process: Any) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"segpipe exited early ({process.returncode}): {process.stderr.read()}")
    return True


def segmenter_processes() -> list[psutil.Process]:
    """This test's Ray segmenter actors (descendants of this process titled ``ray::TileSegmenter...``)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if title.startswith("ray::TileSegmenter"):
            found.append(child)
    return found


def test_ray_actor_killed_mid_inference_restarts_and_the_mask_is_identical(
    tmp_path: Path, slow_checkpoint: Path
) -> None:
    """Real Ray: the segmenter's process is SIGKILLed after its first batch; Ray restarts it (max_restarts) and
    retries the call (max_task_retries), which skips the batches already done."""
    scene = rgb_scene(tmp_path / "scene.tif", 256, 256)
    options: dict[str, Any] = {
        "model": str(slow_checkpoint), "tile_size": 64, "halo": 16, "batch_size": 1, "blend": "crop",
    }
    clean = run_scene(RunSettings(input=str(scene), output=str(tmp_path / "clean.tif"), executor="local", **options))
    work = tmp_path / "work"
    store = Path(ws.store_url(work.resolve(), str(scene)))
    finished = threading.Event()
    seen: dict[str, Any] = {}
    failures: list[BaseException] = []

    def kill_once() -> None:
        try:
            actor = wait_for(
                lambda: finished.is_set() or segmenter_processes(), timeout=TIMEOUT, what="the segmenter actor"
            )
            def tiles_done() -> int:
                flags = done_flags(store)
                return 0 if flags is None else int(flags.sum())

            done = wait_for(
                lambda: finished.is_set() or tiles_done(), timeout=TIMEOUT, what="the first batch", interval=0.005
            )
            if finished.is_set():
                return
            victim = actor[0]
            victim.send_signal(signal.SIGKILL)
            seen.update(pid=victim.pid, done_before=done, done_after=tiles_done())
            restarted = wait_for(
                lambda: [p for p in segmenter_processes() if p.pid != victim.pid] or finished.is_set(),
                timeout=TIMEOUT,
                what="the restarted actor",
            )
            seen["restarted"] = restarted is not True
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    killer = threading.Thread(target=kill_once, daemon=True)
    killer.start()
    try:
        summary = run_scene(
            RunSettings(
                input=str(scene), output=str(tmp_path / "ray.tif"), executor="ray", workers=1, work_dir=str(work),
                **options,
            )
        )
    finally:
        finished.set()
        killer.join(timeout=60)
    assert not failures, failures
    assert "pid" in seen, "inference finished before the actor could be killed"
    total = summary["tiles"]["total"]
    assert seen["done_after"] < total, f"killed after the last tile: {seen}"
    assert seen["restarted"], "Ray did not restart the segmenter"
    assert (tmp_path / "ray.tif").read_bytes() == (tmp_path / "clean.tif").read_bytes()
    assert clean["tiles"]["computed"] == total == 16
    print(f"\nray actor kill: tiles done when killed {seen['done_before']}/{total}; summary {summary['tiles']}")


def test_sigkill_during_inference_resumes_and_is_byte_identical(
    cli: Cli, tmp_path: Path, slow_checkpoint: Path
) -> None:
    scene = rgb_scene(tmp_path / "scene.tif", 384, 384)
    batch = 2
    options = ("--model", slow_checkpoint, "--tile-size", "64", "--halo", "16", "--batch-size", str(batch))
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    store = Path(ws.store_url(work.resolve(), str(scene)))
    run = start_segpipe(
        "run", str(scene), str(out / "m.tif"), *map(str, options), "--work-dir", str(work), *LOCAL, cwd=tmp_path
    )
    try:
        wait_for(
            lambda: alive(run) and (d := done_flags(store)) is not None and 6 <= d.sum() < d.size,
            timeout=TIMEOUT,
            what="inference to be part-way",
            interval=0.01,
        )
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == [], "killed during inference: no output yet"
    done = done_flags(store)
    assert done is not None
    total = done.size
    batches = [list(range(k, min(k + batch, total))) for k in range(0, total, batch)]  # all tiles have data
    finished_batches = sum(len(b) for b in batches if all(done[i] for i in b))

    resumed = cli("run", scene, out / "m.tif", *options, "--work-dir", work, "--json", *LOCAL).summary
    tiles = resumed["tiles"]
    assert resumed["ingest_reused"] is True
    assert tiles["reused"] == finished_batches > 0
    assert tiles["computed"] == total - finished_batches > 0
    recomputed = int(done.sum()) - finished_batches  # written before the kill, computed again
    assert 0 <= recomputed < batch, "at most the tiles of the one batch whose write was cut short"

    clean = cli("run", scene, tmp_path / "clean.tif", *options, *LOCAL)
    assert clean.code == 0, clean.err
    assert (out / "m.tif").read_bytes() == (tmp_path / "clean.tif").read_bytes()
    print(
        f"\nSIGKILL in inference: {int(done.sum())}/{total} tiles done at the kill; resumed run reused "
        f"{tiles['reused']}, computed {tiles['computed']}, recomputed {recomputed} already-written tile(s)"
    )


def test_sigkill_during_export_leaves_no_output_and_the_rerun_succeeds(
    cli: Cli, tmp_path: Path, rgb_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed with the COG complete under its hidden name: no OUTPUT. Without --work-dir the run's temporary work
    directory outlives it too; the next run removes both (and its own work directory when it is done)."""
    scene = rgb_scene(tmp_path / "scene.tif", 200, 150)
    out, temp, ready = tmp_path / "out", tmp_path / "tmp", tmp_path / "ready"
    out.mkdir()
    temp.mkdir()
    options = ("--model", str(rgb_checkpoint), *LOCAL)
    run = start_segpipe(
        "run", str(scene), str(out / "m.tif"), *options,
        cwd=tmp_path, held=True, SEGPIPE_TEST_READY=str(ready), TMPDIR=str(temp),
    )
    try:
        wait_for(lambda: alive(run) and ready.exists(), timeout=TIMEOUT, what="the export to be held")
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL
    partial = partial_path(out / "m.tif")
    assert sorted(p.name for p in out.iterdir()) == [partial.name], "only the hidden partial file"
    abandoned = [p.name for p in temp.iterdir()]
    assert len(abandoned) == 1 and abandoned[0].startswith("segpipe-work-"), abandoned

    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this process's temporary folder, as TMPDIR above
    rerun = cli("run", scene, out / "m.tif", *options)  # the killed run's locks died with it
    assert rerun.code == 0, rerun.err
    assert sorted(p.name for p in out.iterdir()) == ["m.summary.json", "m.tif"], "the partial file is gone"
    assert list(temp.iterdir()) == [], "the abandoned work directory is gone"
    assert cli("run", scene, tmp_path / "clean.tif", *options).code == 0
    assert (out / "m.tif").read_bytes() == (tmp_path / "clean.tif").read_bytes()


def test_a_second_run_on_the_same_output_or_work_store_is_refused(
    cli: Cli, tmp_path: Path, rgb_checkpoint: Path
) -> None:
    scene = rgb_scene(tmp_path / "scene.tif", 200, 150)
    out, other, work = tmp_path / "out", tmp_path / "other", tmp_path / "work"
    out.mkdir()
    other.mkdir()
    ready, release = tmp_path / "ready", tmp_path / "release"
    model = ("--model", str(rgb_checkpoint))
    first = start_segpipe(
        "run", str(scene), str(out / "m.tif"), *model, "--work-dir", str(work), *LOCAL,
        cwd=tmp_path, held=True, SEGPIPE_TEST_READY=str(ready), SEGPIPE_TEST_RELEASE=str(release),
    )
    try:
        wait_for(lambda: alive(first) and ready.exists(), timeout=TIMEOUT, what="the first run to hold its locks")
        same_output = cli("run", scene, out / "m.tif", *model, "--work-dir", tmp_path / "work2", *LOCAL)
        assert_refused(
            same_output,
            f"output {out / 'm.tif'} is in use by another segpipe run; wait for it to finish or choose another path",
        )
        same_store = cli("run", scene, other / "m.tif", *model, "--work-dir", work, *LOCAL)
        store = Path(ws.store_url(work.resolve(), str(scene)))
        assert_refused(
            same_store,
            f"work store {store} is in use by another segpipe run; wait for it to finish or choose another path",
            other,
        )
        assert not (tmp_path / "work2").exists()
    finally:
        release.touch()
        _, stderr = first.communicate(timeout=TIMEOUT)
    assert first.returncode == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["m.summary.json", "m.tif"]
    assert cli("run", scene, tmp_path / "clean.tif", *model, *LOCAL).code == 0
    assert (out / "m.tif").read_bytes() == (tmp_path / "clean.tif").read_bytes(), "nothing corrupted"
