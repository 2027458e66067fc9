"""Object storage: URLs (``s3://``, ``gs://``, ``az://``) read and written with obstore, configured from the
environment the way GDAL and boto read it.

Credentials and endpoint come from the environment only, never from options on the command line:

- S3 and S3-compatible servers: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
  ``AWS_REGION`` (or ``AWS_DEFAULT_REGION``); a custom endpoint as boto reads it (``AWS_ENDPOINT_URL``, e.g.
  ``http://127.0.0.1:9000``) or as GDAL reads it (``AWS_S3_ENDPOINT=host:port`` with ``AWS_HTTPS=NO`` for plain
  HTTP); path-style requests for a custom endpoint unless ``AWS_VIRTUAL_HOSTING=TRUE``.
- Google Cloud Storage: ``GOOGLE_APPLICATION_CREDENTIALS`` / ``GOOGLE_SERVICE_ACCOUNT``; Azure: ``AZURE_STORAGE_*``.

:func:`gdal_config` gives GDAL (inputs read through /vsis3/) the same endpoint, so one set of variables serves
both. Every request is retried with exponential backoff on connection errors, timeouts and server errors
(:data:`RETRY`), so a storage server that stalls or refuses connections for a few seconds costs time, not the run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import AlreadyExistsError
from obstore.store import AzureStore, GCSStore, S3Store

from segpipe.core.errors import InputError, OutputError
from segpipe.core.files import atomic_output

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config

#: URL schemes that name object storage (everything else is a local path).
SCHEMES = ("s3://", "gs://", "az://", "abfs://")

#: Retries of every request on connection errors, timeouts and server errors: backoff from 0.5 s doubling to 10 s
#: (each wait drawn at random below that bound, as object_store does), until 120 s have passed. The retry count only
#: backs the time limit up: with random waits, 10 retries were used up in 3.6 s of refused connections.
RETRY: RetryConfig = {
    "max_retries": 100,
    "retry_timeout": timedelta(seconds=120),
    "backoff": {"init_backoff": timedelta(seconds=0.5), "max_backoff": timedelta(seconds=10), "base": 2},
}
#: Per-request limits: a connection must open within 5 s, a request complete within 30 s (then it is retried).
CLIENT: ClientConfig = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=30)}


def is_object_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names object storage (``s3://``, ``gs://``, ``az://``)."""
    return str(path).startswith(SCHEMES)


@dataclass(frozen=True)
class ObjectUrl:
    """An object-storage URL split into scheme, bucket (container) and key (no leading slash)."""

    scheme: str
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> ObjectUrl:
        if not is_object_url(url):
            raise InputError(f"{url!r} is not an object-storage URL (s3://, gs://, az://)")
        scheme, rest = url.split("://", 1)
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise InputError(f"{url!r} has no bucket; write {scheme}://BUCKET/KEY")
        return cls(scheme, bucket, key.strip("/"))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"

    def child(self, name: str) -> ObjectUrl:
        return ObjectUrl(self.scheme, self.bucket, f"{self.key}/{name}".strip("/"))

    @property
    def parent(self) -> ObjectUrl:
        return ObjectUrl(self.scheme, self.bucket, self.key.rpartition("/")[0])

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment as a URL (``http://host:port``), or None for AWS itself."""
    if os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ["AWS_ENDPOINT_URL"]
    host = os.environ.get("AWS_S3_ENDPOINT")
    if host:
        if "://" in host:
            return host
        https = os.environ.get("AWS_HTTPS", "YES").upper() not in ("NO", "FALSE", "0", "OFF")
        return f"{'https' if https else 'http'}://{host}"
    return None


def _virtual_hosting(endpoint: str | None) -> bool:
    default = "TRUE" if endpoint is None else "FALSE"
    return os.environ.get("AWS_VIRTUAL_HOSTING", default).upper() in ("TRUE", "YES", "1", "ON")


def gdal_config(path: str) -> dict[str, str]:
    """GDAL configuration that reaches the same S3 endpoint as :func:`store_for` (empty where none is needed)."""
    endpoint = s3_endpoint()
    if not endpoint or not path.startswith(("s3://", "/vsis3/")):
        return {}
    scheme, _, host = endpoint.partition("://")
    return {
        "AWS_S3_ENDPOINT": host.rstrip("/"),
        "AWS_HTTPS": "YES" if scheme == "https" else "NO",
        "AWS_VIRTUAL_HOSTING": "TRUE" if _virtual_hosting(endpoint) else "FALSE",
    }


def store_for(url: str | ObjectUrl, *, prefix: bool = False) -> Any:
    """An obstore store for the bucket of ``url``, configured from the environment (see the module docstring).

    Args:
        url: An object-storage URL.
        prefix: Root the store at the URL's key (for a zarr group), instead of at the bucket.
    """
    parsed = url if isinstance(url, ObjectUrl) else ObjectUrl.parse(url)
    root = (parsed.key or None) if prefix else None
    if parsed.scheme == "s3":
        endpoint = s3_endpoint()
        config: S3Config = {"virtual_hosted_style_request": _virtual_hosting(endpoint)}
        if endpoint:
            config["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            config["region"] = region
        client: ClientConfig = {**CLIENT, "allow_http": bool(endpoint and endpoint.startswith("http://"))}
        return S3Store(parsed.bucket, prefix=root, config=config, client_options=client, retry_config=RETRY)
    if parsed.scheme == "gs":
        return GCSStore(parsed.bucket, prefix=root, client_options=CLIENT, retry_config=RETRY)
    return AzureStore(parsed.bucket, prefix=root, client_options=CLIENT, retry_config=RETRY)


def _fail(kind: type[Exception], url: str, doing: str, exc: BaseException) -> Exception:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return kind(f"could not {doing} {url} ({reason[:300]}); check the URL, the credentials and the endpoint")


def read_bytes(url: str) -> bytes:
    """The bytes of one object.

    Raises:
        InputError: it does not exist or cannot be read (after the retries).
    """
    parsed = ObjectUrl.parse(url)
    try:
        return bytes(obstore.get(store_for(parsed), parsed.key).bytes())
    except FileNotFoundError:
        raise InputError(f"{url} does not exist; check the URL") from None
    except Exception as exc:  # obstore's error types for HTTP and credential failures
        raise _fail(InputError, url, "read", exc) from None


def head(url: str) -> dict[str, Any] | None:
    """Size, ETag and modification time of one object, or None when it does not exist."""
    parsed = ObjectUrl.parse(url)
    try:
        meta = obstore.head(store_for(parsed), parsed.key)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise _fail(InputError, url, "look up", exc) from None
    return dict(meta)


def upload_file(local: str | Path, url: str) -> None:
    """Upload a local file as one object. Large files go up in parts and the object appears only when the last
    part is in (S3 multipart upload), so a failed upload leaves nothing at ``url``.

    Raises:
        OutputError: the upload failed after the retries.
    """
    parsed = ObjectUrl.parse(url)
    try:
        with open(local, "rb") as f:
            obstore.put(store_for(parsed), parsed.key, f, chunk_size=16 * 2**20, max_concurrency=4)
    except OSError as exc:
        raise OutputError(f"could not upload {local} to {url}: {exc}") from None
    except Exception as exc:
        raise _fail(OutputError, url, "write", exc) from None


def write_bytes(url: str, data: bytes | str, *, create_only: bool = False) -> bool:
    """Write one object; with ``create_only``, only if it does not exist yet (a conditional create).

    Returns:
        False when ``create_only`` and the object exists; True when written.

    Raises:
        OutputError: the write failed after the retries.
    """
    parsed = ObjectUrl.parse(url)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        obstore.put(store_for(parsed), parsed.key, payload, mode="create" if create_only else "overwrite")
    except AlreadyExistsError:
        return False
    except Exception as exc:
        raise _fail(OutputError, url, "write", exc) from None
    return True


def delete(url: str) -> None:
    """Delete one object (nothing happens when it does not exist)."""
    parsed = ObjectUrl.parse(url)
    try:
        obstore.delete(store_for(parsed), parsed.key)
    except FileNotFoundError:
        return
    except Exception as exc:
        raise _fail(OutputError, url, "delete", exc) from None


def download(url: str, local: str | Path) -> Path:
    """Copy one object to a local file, atomically (a hidden temporary name, then a rename)."""
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = read_bytes(url)
    with atomic_output(target) as tmp:
        tmp.write_bytes(data)
    return target
