"""Credentials kept out of MLflow: secret-named values and ``user:password@`` of URIs, in params, tags, log lines and
the input files logged as artifacts."""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = ("password", "token", "secret", "credential", "api_key", "apikey")


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values whose key names a secret, and user:password@ in URIs (tracking credentials never end up in
    params, e.g. through the job's ``tracking_uri``)."""
    return {k: ("***" if any(w in k.lower() for w in SECRET_WORDS) else
                safe_uri(v) if isinstance(v, str) and "://" in v else v) for k, v in params.items()}


_URI_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@'\"]+@")
_SECRET_LINE = re.compile(r"^(\s*-?\s*[\w.-]*(?:" + "|".join(SECRET_WORDS) + r")[\w.-]*\s*[:=]\s*)\S.*$",
                          re.IGNORECASE | re.MULTILINE)


def redact_text(text: str) -> str:
    """A YAML file's text without credentials: user:password@ of URIs and the values of keys naming a secret."""
    return _SECRET_LINE.sub(r"\1'***'", _URI_USERINFO.sub(r"\1***@", text))


def safe_uri(uri: str) -> str:
    """A tracking URI without user:password@ (for logs and tags)."""
    if "://" in uri and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri
