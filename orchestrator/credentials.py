"""Credentials in URIs (an MLflow `https://user:password@host`): kept in memory, written nowhere.

A recipe's `tracking.uri` holds the redacted form `scheme://***@host...` as soon as it is
validated, so the recipe file of a run, its MLflow artifact and params, `state.json`,
`summary.json` and every printed line carry no password; the original stays in this
process (`hold`), and only the MLflow client gets it back (`reveal`). A later process (a
`resume`) has only the redacted form: MLflow then takes the credentials from its own
variables, MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN,
or its ~/.mlflow/credentials file).

The userinfo of a URI ends at its LAST `@` before the query: a password holding a raw `@` or
`/` (which a strict parse would cut short, leaving the rest of it in the host or path) is
redacted whole. A path with an `@` in it and no credentials loses its start too; a redacted
URI errs on the safe side.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

MARK = "***"
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_held: dict[str, str] = {}  # redacted URI -> the URI as given (this process only)


def _split(uri: str) -> tuple[str, str, str] | None:
    """(scheme, userinfo, everything after its `@`), or None for a URI without userinfo."""
    try:
        parts = urlsplit(uri)
    except ValueError:  # e.g. an unclosed IPv6 bracket: cut at the last `@` all the same
        parts = None
    scheme, sep, rest = uri.partition("://")
    if not sep or (parts is not None and not parts.netloc):
        return None  # no authority (sqlite:///path, file:///path): nothing to hide
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = before_query.rpartition("@")
    if not at:
        return None
    return scheme, userinfo, rest[len(userinfo) + 1 :]


def redact_uri(uri: str) -> str:
    """`scheme://user:pass@host/path` -> `scheme://***@host/path`; unchanged without userinfo."""
    split = _split(uri)
    return uri if split is None else f"{split[0]}://{MARK}@{split[2]}"


def redact(text: str) -> str:
    """Every URI in a line of text redacted (see `redact_uri`)."""
    return _URI.sub(lambda m: redact_uri(m.group(0)), text)


def without_userinfo(uri: str) -> str:
    """The URI with no credentials at all (a health probe that needs none)."""
    split = _split(uri)
    return uri if split is None else f"{split[0]}://{split[2]}"


def hold(uri: str) -> str:
    """Keep `uri`'s credentials in this process; returns the redacted form to store."""
    safe = redact_uri(uri)
    if safe != uri:
        _held[safe] = uri
    return safe


def reveal(uri: str) -> str:
    """The URI a client connects with: the original `hold` kept, or for a redacted URI this
    process never held (a resumed run), the URI without userinfo, MLflow reading the
    credentials from its environment variables."""
    if uri in _held:
        return _held[uri]
    return without_userinfo(uri) if is_redacted(uri) else uri


def is_redacted(uri: str) -> bool:
    split = _split(uri)
    return split is not None and split[1] == MARK


def lost(uri: str) -> bool:
    """A redacted URI whose credentials neither this process nor MLflow (its variables, or
    its ~/.mlflow/credentials file) holds."""
    if not is_redacted(uri) or uri in _held:
        return False
    from mlflow.utils.credentials import read_mlflow_creds

    return not (read_mlflow_creds().password or os.environ.get("MLFLOW_TRACKING_TOKEN"))
