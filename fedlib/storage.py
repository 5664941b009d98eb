"""Object I/O through fsspec, so `file://`, `memory://`, `s3://`, `gs://` and `az://` are one code path."""

from __future__ import annotations

import posixpath
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from fedlib.rejection import Reason, UpdateRejected


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def write_atomic(url: str, data: bytes) -> int:
    """Readers see the whole object or none of it. An object store's PUT already is atomic; a
    local file is written beside its target and renamed over it."""
    fs, path = fsspec.url_to_fs(url)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)
    return len(data)


def read_limited(url: str, max_bytes: int) -> bytes:
    """Fetch an object, refusing one over `max_bytes` before downloading it."""
    fs, path = fsspec.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise UpdateRejected(Reason.MISSING, f"no object at {url}") from None
    if size is not None and size > max_bytes:
        raise UpdateRejected(Reason.TOO_LARGE, f"{url} is {size} bytes, limit {max_bytes}")
    return fs.cat_file(path)


def read_bytes(url: str) -> bytes:
    fs, path = fsspec.url_to_fs(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = fsspec.url_to_fs(url)
    return fs.exists(path)


def list_prefix(url: str) -> list[str]:
    """Every object under `url`, as full paths of its filesystem (for audits and scans)."""
    fs, path = fsspec.url_to_fs(url)
    if not fs.exists(path):
        return []
    return sorted(fs.find(path))
