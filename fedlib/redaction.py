"""What of a configuration may be written where others read it: MLflow params, Prefect flow-run
parameters and logs, manifests.

One rule, in one place. A config may not *hold* a credential (`secrets_in` lists them, and the
config refuses to validate), and whatever is logged passes through `loggable`, which redacts any
that slipped in anyway (a URL's password, user name or signed query, a secret-looking key) and
the test-only DP noise seed, with which anyone who can read MLflow could subtract the noise
again. Error messages that quote a URL pass through `redact_text`.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"
SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|account_key|sas_token|connection_string|api_key|apikey|private_key|^key$|token"
    r"|authorization|bearer|cookie|signature)",
    re.I,
)
# Query parameters that carry a credential: Azure SAS (`sig`), S3 and GCS presigned URLs, OAuth
# and API tokens. A URL with any of them is a credential however it is spelt otherwise.
SECRET_QUERY = re.compile(
    r"^(sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|token|access_token|id_token|refresh_token|auth|code|key|api_key|apikey|password|secret|client_secret)$",
    re.I,
)
_CONTAINER_AT_ACCOUNT = {"az", "abfs", "abfss", "adl"}  # `container@account...`: the user part names a container
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()]+")
_SCHEMA_FIELDS = {"secret_block"}  # names a Secret block; holds none
_NEVER_LOGGED = {"noise_seed"}


def _is_secret_key(key: str, value: Any) -> bool:
    if key in _SCHEMA_FIELDS:
        return False
    return bool(SECRET_KEY.search(key)) and not (key == "token" and value == "anon")  # gcsfs's anonymous access


def _credential_url(value: str) -> tuple[str, str] | None:
    """(`value` with its credentials replaced, what they were), if it is a URL that carries any:
    a password, a user name that is not an Azure container (a token as user name), or a query
    parameter that is a signature or a token (Azure SAS, presigned S3 and GCS URLs)."""
    if "://" not in value:
        return None
    try:
        parts = urlsplit(value.strip())
        scheme = parts.scheme.lower()
        found = []
        netloc = parts.netloc
        if parts.password is not None:
            found.append("a password")
        elif parts.username is not None and scheme not in _CONTAINER_AT_ACCOUNT:
            found.append("a user name (a token?)")
        if found:
            host = parts.hostname or ""
            netloc = f"{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
        query = parse_qsl(parts.query, keep_blank_values=True)
        if any(SECRET_QUERY.match(name) for name, _ in query):
            found.append("a signed or token query")
            query = [(name, REDACTED if SECRET_QUERY.match(name) else v) for name, v in query]
        if not found:
            return None
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="<>"))), " and ".join(found)
    except ValueError:
        return REDACTED, "an unreadable URL"


def redact_text(text: str) -> str:
    """`text` (an error message, a log line) with the credentials of every URL in it replaced."""

    def redacted(match: re.Match) -> str:
        url = match.group(0).rstrip(":,.;")
        return (_credential_url(url) or (url, ""))[0] + match.group(0)[len(url) :]

    return _URL_IN_TEXT.sub(redacted, text)


def secrets_in(raw: Any, path: str = "") -> list[tuple[str, str]]:
    """Where a raw config holds a credential, and what kind: (dotted path, why)."""
    found = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _is_secret_key(key, value) and key not in _NEVER_LOGGED and value is not None:
                found.append((where, "looks like a credential"))
            else:
                found += secrets_in(value, where)
    elif isinstance(raw, (list, tuple)):
        for i, value in enumerate(raw):
            found += secrets_in(value, f"{path}[{i}]")
    elif isinstance(raw, str) and (credential := _credential_url(raw)) is not None:
        found.append((path, f"a URL with {credential[1]}"))
    return found


def loggable(value: Any) -> Any:
    """A copy of a JSON-like value that is safe to show: secret-looking keys, URL passwords and
    the noise seed redacted."""
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            hidden = isinstance(key, str) and (key in _NEVER_LOGGED or _is_secret_key(key, inner))
            out[key] = REDACTED if hidden and inner is not None else loggable(inner)
        return out
    if isinstance(value, (list, tuple)):
        return [loggable(v) for v in value]
    if isinstance(value, str):
        credential = _credential_url(value)
        return credential[0] if credential else value
    return value
