"""Atomic files: a final file appears complete or not at all.

Everything segpipe writes for users (masks, probabilities, summaries, checkpoints, training state) is written
under a hidden temporary name next to its final path, ``.NAME.segpipe-partial``, flushed to disk and renamed
into place. A failed or killed writer leaves at most that hidden file, which the next writer of the same path
removes first. The rename is atomic on one file system, so the temporary file lives in the final directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from segpipe.core.errors import OutputError

log = logging.getLogger(__name__)

#: Suffix of temporary files written before an atomic rename (ignored by git).
PARTIAL_SUFFIX = ".segpipe-partial"
#: The lock file inside a temporary folder; its holder is the live process that uses the folder.
FOLDER_LOCK = ".segpipe-run.lock"


def partial_path(output: str | Path) -> Path:
    """The hidden temporary name ``output`` is written under before it is renamed into place."""
    out = Path(output)
    return out.with_name(f".{out.name}{PARTIAL_SUFFIX}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(output: str | Path, *, shared: bool = False) -> Iterator[Path]:
    """Yield the temporary path of ``output``; when the block succeeds, flush it to disk and rename it to
    ``output``; when it fails (any exception, KeyboardInterrupt included), remove it.

    ``shared``: several processes may write the same ``output`` at once with the same bytes (a model cache that
    every segmenter on a machine fills): each writes its own ``.NAME.<random>.segpipe-partial``, so none removes or
    renames another's, and the last rename wins with identical content. Otherwise the one hidden name of
    :func:`partial_path`, whose leftover from a killed writer the next writer removes.
    """
    if shared:
        out = Path(output)
        tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}{PARTIAL_SUFFIX}")
    else:
        tmp = partial_path(output)
        tmp.unlink(missing_ok=True)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: bytes | str, *, shared: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically, creating its parent folders (``shared``: see
    :func:`atomic_output`).

    Raises:
        OutputError: the file cannot be written (disk full, permissions), saying so in one line.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path, shared=shared) as tmp:
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise OutputError(f"could not write {path}: {exc}; check free space and permissions") from None
    return path


#: What an OSError says when its disk or quota is full (errno, and the text a wrapped one keeps).
FULL_ERRNOS = (28, 122)  # ENOSPC, EDQUOT
FULL_TEXTS = ("No space left on device", "Disk quota exceeded")


def is_full(error: BaseException) -> bool:
    """Whether ``error`` says its filesystem (or quota) is full, also when it comes wrapped (a Ray task's error)."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    return any(text in str(error) for text in FULL_TEXTS)


@contextlib.contextmanager
def full_disk_named(what: str, where: str) -> Iterator[None]:
    """Turn "no space left" in the block into one :class:`OutputError` naming the full location.

    Raises:
        OutputError: ``what`` (e.g. "the work directory") at ``where`` is full.
    """
    try:
        yield
    except Exception as exc:
        if not is_full(exc):
            raise
        raise OutputError(
            f"{what} {where} is full (no space left on device); free space there or choose another, then re-run "
            "to resume"
        ) from None


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def temporary_folder(kind: str) -> Iterator[Path]:
    """A new folder ``<temp dir>/segpipe-<kind>-XXXXXXXX``, removed when the block ends.

    The folder is locked (``flock`` on a file inside it) for the block, and the kernel drops that lock when the
    process dies. A process killed with SIGKILL (or by the OOM killer) cannot remove its folder; the next call
    with the same ``kind`` removes every such folder of this user whose lock nobody holds.
    """
    remove_abandoned_folders(kind)
    # locked before it gets the name the sweep looks for, so a live folder is never taken for abandoned
    tmp = Path(tempfile.mkdtemp(prefix=f"segpipe-new-{kind}-"))
    handle = open(tmp / FOLDER_LOCK, "w")  # noqa: SIM115 - held open for the lock's lifetime
    fcntl.flock(handle, fcntl.LOCK_EX)
    path = tmp.with_name(f"segpipe-{kind}-" + tmp.name.removeprefix(f"segpipe-new-{kind}-"))
    os.rename(tmp, path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        handle.close()


def remove_abandoned_folders(kind: str) -> None:
    """Remove this user's ``segpipe-<kind>-*`` temporary folders whose lock nobody holds (their process died)."""
    for path in Path(tempfile.gettempdir()).glob(f"segpipe-{kind}-*"):
        lock = path / FOLDER_LOCK
        try:
            if path.stat().st_uid != os.getuid() or not lock.is_file():
                continue
            with open(lock, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                log.info("removing %s, the temporary folder of a run that was killed", path)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # BlockingIOError: a live run holds it; or it vanished meanwhile
            continue
