"""Single-writer locks for outputs and work stores, so that two runs never write the same thing.

Today: an exclusive, non-blocking ``flock`` on a lock file in the system temp directory (``SEGPIPE_LOCK_DIR``
overrides), keyed by the target's absolute path, so nothing is left next to outputs and the kernel releases the
lock when the process dies: a killed run never blocks the next one. This works between processes of one
machine; a store on object storage needs a lock object there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from segpipe.core.errors import OutputError


def path_key(path: str) -> bytes:
    """An absolute path as bytes for hashing; ``surrogatepass`` keeps file names that are not UTF-8 hashable."""
    return os.path.abspath(path).encode("utf-8", "surrogatepass")


def lock_dir() -> Path:
    """Where lock files live."""
    return Path(os.environ.get("SEGPIPE_LOCK_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "segpipe-locks"))


@contextlib.contextmanager
def exclusive_lock(target: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock for ``target`` for the duration of the block.

    Args:
        target: The path the lock protects (an output file, a work store).
        what: What it is, for the message ("output", "work store").

    Raises:
        OutputError: another segpipe process holds the lock.
    """
    key = hashlib.sha256(path_key(str(target))).hexdigest()[:24]
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{key}.lock", "w")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                f"{what} {target} is in use by another segpipe run; wait for it to finish or choose another path"
            ) from None
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()
