"""Secrets stay out of what segpipe writes and says: summaries, STAC Items, Prefect artifacts, logs, error lines.

:func:`redact` replaces, in any text, the password of a URL's user info (``https://user:***@host``), the values
of credential query parameters (a presigned URL's ``X-Amz-Signature``, an Azure SAS ``sig``, ``token`` ...), and the
value of every secret environment variable that is set (:data:`SECRET_VARIABLES`). Pure, apart from reading the
environment; :func:`redact_tree` applies it to every string of a JSON-like value.
"""

from __future__ import annotations

import os
import re
from typing import Any

#: Environment variables whose values are secrets wherever they appear.
SECRET_VARIABLES = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "RAY_AUTH_TOKEN",
    "PREFECT_API_KEY",
    "SEGPIPE_NOTIFY_URL",
)
#: Query parameters whose values are credentials (lower case; matched case-insensitively).
SECRET_PARAMETERS = (
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "x-goog-credential",
    "sig",
    "signature",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "password",
)
MASK = "***"
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/:@\s]*):(?P<password>[^/@\s]+)@")
_PARAMETER = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(p) for p in SECRET_PARAMETERS) + r"))=(?P<value>[^&#\s\"'<>]+)",
    flags=re.IGNORECASE,
)
#: Shortest environment value taken as a secret (shorter ones would match ordinary text).
MIN_SECRET = 8


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """``text`` with URL passwords, credential query values and secret environment values replaced by ``***``."""
    env = os.environ if environ is None else environ
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    out = _PARAMETER.sub(lambda m: f"{m['name']}={MASK}", out)
    for name in SECRET_VARIABLES:
        value = env.get(name, "")
        if len(value) >= MIN_SECRET:
            out = out.replace(value, MASK)
    return out


def redact_tree(value: Any, environ: dict[str, str] | None = None) -> Any:
    """:func:`redact` applied to every string (keys too) of a JSON-like value (dicts, lists, tuples, scalars)."""
    if isinstance(value, str):
        return redact(value, environ)
    if isinstance(value, dict):
        return {redact_tree(k, environ): redact_tree(v, environ) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v, environ) for v in value]
    return value


def host_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, for saying where something went without its path (a webhook's path is
    often its secret)."""
    match = re.match(r"(?P<base>[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]+)", url)
    return redact(match["base"]) if match else "the URL"
