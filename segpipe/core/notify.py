"""Webhooks: a night's report POSTed as JSON to a URL the user gave (``--notify``, ``$SEGPIPE_NOTIFY_URL``)."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from segpipe.core.secrets import host_of, redact, redact_tree

log = logging.getLogger(__name__)


def post_report(url: str, report: dict[str, Any]) -> None:
    """POST ``report`` as JSON (secrets redacted) to ``url``; a failing hook is logged, by its host only (a webhook's
    path is often its secret), never fatal."""
    request = urllib.request.Request(
        url, data=json.dumps(redact_tree(report)).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        urllib.request.urlopen(request, timeout=30).close()
    except OSError as exc:
        log.warning("could not notify %s: %s", host_of(url), redact(str(exc)).replace(url, host_of(url)))
