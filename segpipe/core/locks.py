"""Single-writer locks for outputs and work stores, so that two runs never write the same thing.

- Local paths: an exclusive, non-blocking ``flock`` on a lock file in the system temp directory
  (``SEGPIPE_LOCK_DIR`` overrides), keyed by the target's absolute path, so nothing is left next to outputs and the
  kernel releases the lock when the process dies: a killed run never blocks the next one. Between the processes of
  one machine.
- Object storage (``s3://``, ...): a lease object ``<bucket>/.segpipe-locks/<hash of the URL>.json`` created with a
  conditional write (it fails when the object exists), holding who holds it and until when. The holder renews it
  every :data:`LEASE_SECONDS` / 3 seconds; a lease not renewed for :data:`LEASE_SECONDS` (its holder was killed or
  lost its network) is taken over by the next run. Between all machines that see the bucket.

Both refuse a second writer with the same one-line message.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from segpipe.core.errors import InputError, OutputError
from segpipe.core.objects import ObjectUrl, delete, is_object_url, read_bytes, write_bytes
from segpipe.core.paths import is_remote

log = logging.getLogger(__name__)

#: Seconds an object-storage lease lasts without renewal.
LEASE_SECONDS = 60.0


def path_key(path: str) -> bytes:
    """A path as bytes for hashing: absolute for a local path, as given for a URL; ``surrogatepass`` keeps file
    names that are not UTF-8 hashable."""
    text = path if is_remote(path) or is_object_url(path) else os.path.abspath(path)
    return text.encode("utf-8", "surrogatepass")


def lock_dir() -> Path:
    """Where local lock files live."""
    return Path(os.environ.get("SEGPIPE_LOCK_DIR", Path(os.environ.get("TMPDIR", "/tmp")) / "segpipe-locks"))


def _in_use(what: str, target: str | Path) -> OutputError:
    return OutputError(
        f"{what} {target} is in use by another segpipe run; wait for it to finish or choose another path"
    )


@contextlib.contextmanager
def exclusive_lock(target: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock for ``target`` for the duration of the block (see the module docstring).

    Args:
        target: The path or URL the lock protects (an output, a work store).
        what: What it is, for the message ("output", "work store").

    Raises:
        OutputError: another segpipe process holds the lock.
    """
    if is_object_url(str(target)):
        with lease(str(target), what):
            yield
        return
    key = hashlib.sha256(path_key(str(target))).hexdigest()[:24]
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{key}.lock", "w")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(what, target) from None
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def lease_url(target: str) -> str:
    """The lease object of an object-storage ``target``."""
    parsed = ObjectUrl.parse(target)
    digest = hashlib.sha256(str(parsed).encode()).hexdigest()[:24]
    return str(ObjectUrl(parsed.scheme, parsed.bucket, f".segpipe-locks/{digest}.json"))


@contextlib.contextmanager
def lease(target: str, what: str, *, seconds: float = LEASE_SECONDS) -> Iterator[None]:
    """Hold the object-storage lease of ``target`` for the block, renewing it on a background thread.

    Raises:
        OutputError: a live lease of another run exists.
    """
    url = lease_url(target)
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def record() -> str:
        return json.dumps({"target": target, "holder": holder, "expires": time.time() + seconds})

    if not write_bytes(url, record(), create_only=True):
        try:
            current = json.loads(read_bytes(url))
        except (InputError, ValueError):  # vanished meanwhile, or unreadable: treat as expired
            current = {"expires": 0}
        if float(current.get("expires", 0)) > time.time():
            raise _in_use(what, target)
        log.info("taking over the expired lease of %s (held by %s)", target, current.get("holder"))
        delete(url)
        if not write_bytes(url, record(), create_only=True):
            raise _in_use(what, target)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            try:
                write_bytes(url, record())
            except OutputError as exc:  # the storage is unreachable for a while: keep trying until released
                log.warning("could not renew the lease of %s: %s", target, exc)

    thread = threading.Thread(target=renew, name="segpipe-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(OutputError):
            delete(url)
