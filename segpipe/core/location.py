"""Locations: where segpipe reads and writes its own files (outputs, summaries, STAC documents, work stores, models),
either a local path or an object-storage URL (``s3://``, ``gs://``, ``az://``; :mod:`segpipe.core.objects`).

A :class:`Location` answers every question the stages would otherwise ask of the scheme: its name and folder, the
file beside it, whether it exists, reading, writing atomically (a local file under a hidden temporary name renamed
into place; an object in one request, which appears whole), removing, listing a folder, the write probe before any
work, the single-writer lock, and building a file locally that appears at the location only when complete. The
stages hold strings (JSON-friendly settings) and wrap them in a ``Location`` where they touch storage, so no stage
branches on the scheme.

Scene inputs are not locations: GDAL opens them (``/vsicurl/``, ``/vsis3/``, inline VRTs, ...;
:mod:`segpipe.core.raster`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import obstore

from segpipe.core import objects
from segpipe.core.errors import InputError, OutputError, SegpipeError
from segpipe.core.files import write_atomically
from segpipe.core.locks import exclusive_lock
from segpipe.core.objects import ObjectUrl, is_object_url
from segpipe.core.secrets import redact_tree

#: The name prefix of the probe files and objects written to check that a folder can be written.
PROBE_PREFIX = ".segpipe-write-test-"


class Location:
    """A local path or an object-storage URL, as given (see the module docstring).

    Args:
        where: A path, a URL, or a Location. A URL's trailing slash is dropped (a folder and a prefix are the same
            place); a local path is kept as given (relative paths stay relative: :meth:`absolute` resolves them).
    """

    __slots__ = ("_text", "_url")

    def __init__(self, where: str | os.PathLike[str] | Location) -> None:
        text = str(where)
        self._url = ObjectUrl.parse(text) if is_object_url(text) else None
        self._text = str(self._url) if self._url is not None else text

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Location({self._text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and self._text == other._text

    def __hash__(self) -> int:
        return hash(self._text)

    # --- names -------------------------------------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        """Whether this is a path on this machine's file system (else an object-storage URL that every machine
        with the credentials reaches)."""
        return self._url is None

    @property
    def path(self) -> Path:
        """The local path.

        Raises:
            ValueError: this is an object-storage URL.
        """
        if self._url is not None:
            raise ValueError(f"{self._text} is an object-storage URL, not a local path")
        return Path(self._text)

    @property
    def name(self) -> str:
        """The last part of the path or key."""
        return self._url.name if self._url is not None else Path(self._text).name

    @property
    def parent(self) -> Location:
        """The folder (or prefix) this location is in."""
        if self._url is not None:
            return Location(str(self._url.parent))
        return Location(Path(self._text).parent)

    def child(self, name: str) -> Location:
        """The file or folder ``name`` inside this folder."""
        if self._url is not None:
            return Location(str(self._url.child(name)))
        return Location(Path(self._text) / name)

    def beside(self, name: str) -> Location:
        """The file ``name`` in this location's folder."""
        return self.parent.child(name)

    def absolute(self) -> Location:
        """This location with a local path made absolute (``..`` and symlinks kept); a URL as it is."""
        return self if self._url is not None else Location(os.path.abspath(self._text))

    def same_as(self, other: Location) -> bool:
        """Whether both name the same file (local paths compared absolute)."""
        return self.absolute() == other.absolute()

    def check_beside(self, anchor: Location, what: str, *, anchor_name: str = "OUTPUT") -> None:
        """Refuse this location unless it is written next to ``anchor``: a local path that resolves (through ``..``
        and symlinks) inside ``anchor``'s folder, or an object in the same bucket and prefix as ``anchor``.

        Raises:
            OutputError: naming ``what`` (e.g. ``--probabilities``) and ``anchor_name``.
        """
        if anchor._url is None and self._url is None:
            directory = Path(anchor._text).absolute().parent.resolve()
            resolved = Path(self._text).resolve()
            if not resolved.is_relative_to(directory):
                raise OutputError(
                    f"{what} {self._text!r} resolves to {resolved}, outside the directory of {anchor_name} "
                    f"({directory}); write it next to {anchor_name}"
                )
            return
        folder = anchor.parent
        if self._url is None or self.parent != folder or "/../" in f"/{self._text}/":
            raise OutputError(
                f"{what} {self._text!r} is not beside {anchor_name} ({folder}/); write it next to {anchor_name}"
            )

    # --- reading -----------------------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a file (or an object) is there."""
        return objects.head(self._text) is not None if self._url is not None else Path(self._text).is_file()

    def is_folder(self) -> bool:
        """Whether this is an existing local folder (an object-storage prefix always is one: it needs no
        creating)."""
        return self._url is not None or Path(self._text).is_dir()

    def read_bytes(self) -> bytes:
        """The file's bytes.

        Raises:
            InputError: it does not exist or cannot be read (for an object, after the retries).
        """
        if self._url is not None:
            return objects.read_bytes(self._text)
        try:
            return Path(self._text).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read {self._text}: {exc.strerror or exc}") from None

    @contextlib.contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """The file opened for reading, as a binary file object (an object is read whole, into memory)."""
        if self._url is not None:
            yield io.BytesIO(self.read_bytes())
            return
        try:
            handle = open(self._text, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise InputError(f"cannot read {self._text}: {exc.strerror or exc}") from None
        with handle:
            yield handle

    def read_json(self) -> Any | None:
        """The JSON document here, or None when there is none or it is not JSON."""
        try:
            return json.loads(self.read_bytes())
        except (ValueError, SegpipeError):
            return None

    def list(self, suffix: str = "", *, recursive: bool = False) -> list[Location]:
        """The files in this folder whose names end in ``suffix``, sorted (``recursive``: in its subfolders too).

        Raises:
            InputError: the folder cannot be listed (an object-storage error: credentials, endpoint, bucket).
        """
        if self._url is None:
            folder = Path(self._text)
            found = folder.rglob(f"*{suffix}") if recursive else folder.glob(f"*{suffix}")
            return [Location(p) for p in sorted(found) if p.is_file()]
        url = self._url
        prefix = url.key
        keys = []
        try:
            for page in obstore.list(objects.store_for(url), prefix=prefix or None):
                for meta in page:
                    key = meta["path"]
                    inside = not prefix or key.startswith(f"{prefix}/")
                    nested = "/" in key[len(prefix) :].lstrip("/")
                    if inside and key.endswith(suffix) and (recursive or not nested):
                        keys.append(key)
        except Exception as exc:  # obstore's errors (credentials, endpoint, missing bucket)
            reason = str(exc).splitlines()[0][:200]
            raise InputError(f"{self._text!r} cannot be listed ({reason}); check the URL") from None
        return [Location(str(ObjectUrl(url.scheme, url.bucket, key))) for key in sorted(keys)]

    # --- writing -----------------------------------------------------------------------------------------

    def write_atomically(self, data: bytes | str) -> None:
        """Write the whole file: a local file under a hidden temporary name, renamed into place
        (:func:`segpipe.core.files.write_atomically`); an object in one request.

        Raises:
            OutputError: it cannot be written, saying why in one line.
        """
        if self._url is not None:
            objects.write_bytes(self._text, data)
        else:
            write_atomically(self._text, data)

    def write_json(self, data: Any, *, indent: int | None = 2) -> None:
        """Write ``data`` as JSON (a trailing newline), atomically, secrets redacted
        (:func:`segpipe.core.secrets.redact_tree`): segpipe's one JSON writer."""
        self.write_atomically(json.dumps(redact_tree(data), indent=indent) + "\n")

    def remove(self) -> None:
        """Remove the file or object; nothing happens when it is not there."""
        if self._url is not None:
            objects.delete(self._text)
        else:
            Path(self._text).unlink(missing_ok=True)

    def make_folder(self) -> None:
        """Create this local folder and its parents if missing (object storage needs no folders)."""
        if self._url is None:
            Path(self._text).mkdir(parents=True, exist_ok=True)

    def probe_write(self) -> None:
        """Write and remove a probe file (or object) in this folder: what a write here will meet (permissions,
        read-only mounts, credentials, a missing bucket), found before any work.

        Raises:
            OutputError: the probe could not be written, with the reason.
        """
        probe = self.child(f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}")
        if self._url is not None:
            objects.write_bytes(str(probe), b"")
            objects.delete(str(probe))
            return
        try:  # os.access says yes to root everywhere, and to read-only mounts, /proc and /sys: try for real
            with tempfile.NamedTemporaryFile(dir=self._text, prefix=PROBE_PREFIX):
                pass
        except OSError as exc:
            raise OutputError(str(exc.strerror or exc)) from None

    def check_writable_file(self, what: str, *, overwrite: bool) -> None:
        """Refuse, before any work, a file that cannot be written here as a new one (or, with ``overwrite``, a
        replaced one): a folder or a key that names none, a missing or unwritable folder, an existing file.

        Raises:
            OutputError: naming ``what`` (e.g. ``output``, ``--probabilities``) and what to do.
        """
        if self._url is not None:
            if not self._url.key or self._text.endswith("/"):
                raise OutputError(f"{what} {self._text!r} names no object; give a key such as {self.child('mask.tif')}")
            if self.exists() and not overwrite:
                raise OutputError(f"{what} {self._text!r} already exists; pass --overwrite to replace it")
            try:
                self.parent.probe_write()
            except OutputError as exc:
                raise OutputError(f"cannot write {what} {self._text!r}: {exc}") from None
            return
        out = Path(self._text)
        if out.is_dir():
            raise OutputError(f"{what} {self._text!r} is a directory; give a file name such as {out / 'mask.tif'}")
        parent = out.parent if str(out.parent) else Path(".")
        if parent.exists() and not parent.is_dir():
            raise OutputError(
                f"the directory of {what} {self._text!r}, {parent}, is a file; give a path in a directory"
            )
        if not parent.is_dir():
            raise OutputError(f"the directory of {what} {self._text!r} does not exist; create {parent} first")
        unwritable = f"cannot write {what} {self._text!r}: directory {parent} is not writable"
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(unwritable)
        try:
            Location(parent).probe_write()
        except OutputError as exc:
            raise OutputError(f"{unwritable} ({exc})") from None
        if out.exists() and not overwrite:
            raise OutputError(f"{what} {self._text!r} already exists; pass --overwrite to replace it")

    def check_folder(self, what: str) -> None:
        """Refuse, before any work, a folder that cannot hold segpipe's files: a local path that is a file or whose
        parent is missing (the folder itself is created when needed); a prefix where no object can be written.

        Raises:
            OutputError: naming ``what`` (e.g. ``--work-dir``) and what to do.
        """
        if self._url is not None:
            try:
                self.probe_write()
            except OutputError as exc:
                raise OutputError(f"cannot write to {what} {self._text!r}: {exc}") from None
            return
        folder = Path(self._text)
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{what} {self._text!r} is a file, not a directory")
        if not folder.exists() and not folder.parent.is_dir():
            raise OutputError(f"the parent of {what} {self._text!r} does not exist; create it first")

    def lock(self, what: str) -> contextlib.AbstractContextManager[None]:
        """The single-writer lock of this location for a block (:func:`segpipe.core.locks.exclusive_lock`: a
        ``flock`` locally, a lease object on object storage); ``what`` names it in the refusal."""
        return exclusive_lock(self._text, what)

    @contextlib.contextmanager
    def upload_when_complete(self, scratch: Path) -> Iterator[Path]:
        """The local path to build this file at: the location itself when it is local (the builder writes
        atomically), else ``scratch``, uploaded as one object when the block succeeds and removed either way, so
        a failed build or upload leaves nothing here.

        Raises:
            OutputError: the upload failed (after the retries).
        """
        if self._url is None:
            yield Path(self._text)
            return
        try:
            yield scratch
            objects.upload_file(scratch, self._text)
        finally:
            scratch.unlink(missing_ok=True)
