"""What of a configuration may be written where others read it: MLflow params, Prefect flow-run
parameters and logs, manifests.

One rule, in one place. A config may not *hold* a credential (`secrets_in` lists them, and the
config refuses to validate), and whatever is logged passes through `loggable`, which redacts any
that slipped in anyway (a URL's password, a secret-looking key) and the test-only DP noise seed,
with which anyone who can read MLflow could subtract the noise again.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|account_key|sas_token|connection_string|api_key|apikey|private_key|^key$|token)",
    re.I,
)
_SCHEMA_FIELDS = {"secret_block"}  # names a Secret block; holds none
_NEVER_LOGGED = {"noise_seed"}


def _is_secret_key(key: str, value: Any) -> bool:
    if key in _SCHEMA_FIELDS:
        return False
    return bool(SECRET_KEY.search(key)) and not (key == "token" and value == "anon")  # gcsfs's anonymous access


def _url_with_password(value: str) -> str | None:
    """`value` with its password replaced, if it is a URL that carries one."""
    if "@" not in value or "://" not in value:
        return None
    try:
        parts = urlsplit(value)
        if parts.password is None:
            return None
        host = parts.hostname or ""
        netloc = f"{parts.username}:{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return REDACTED
    return urlunsplit(parts._replace(netloc=netloc))


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
    elif isinstance(raw, str) and _url_with_password(raw) is not None:
        found.append((path, "a URL with a password"))
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
        return _url_with_password(value) or value
    return value
