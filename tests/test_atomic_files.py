"""Atomic writes: one writer's hidden name, and a shared target that several processes fill at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from segpipe.core.files import partial_path, write_atomically


def _write_many(path: str, data: bytes, times: int) -> None:
    for _ in range(times):
        write_atomically(path, data, shared=True)


def test_concurrent_writers_of_a_shared_target_never_fail_and_leave_no_partial(tmp_path: Path) -> None:
    """Segmenters on one machine fill the same model-cache entry at once (seen in CI: with one hidden name, one
    writer renamed the other's temporary file away and the second rename failed)."""
    target = tmp_path / "cache" / "model.json"
    data = b'{"same": "bytes"}\n' * 100
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_many, args=(str(target), data, 200)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.json"], "no temporary file is left"


def test_a_single_writer_uses_one_hidden_name_and_removes_a_leftover(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    partial_path(target).write_bytes(b"left by a killed writer")
    write_atomically(target, "{}\n")
    assert target.read_text() == "{}\n" and not partial_path(target).exists()
