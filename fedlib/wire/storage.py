"""Object I/O through fsspec, so `file://`, `memory://`, `s3://`, `gs://` and `az://` are one code path.

`options` are the fsspec filesystem's keyword arguments for one cloud (endpoint, region, and the
credentials that the caller resolved from a secret store); none of them are ever logged.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

# gcsfs otherwise probes for hierarchical-namespace buckets over gRPC and waits out a 60 s
# timeout per bucket call against anything but Google itself (checked with the GCS emulator).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.asyn import AsyncFileSystem  # noqa: E402
from fsspec.implementations.local import LocalFileSystem  # noqa: E402

from fedlib.rejection import Reason, UpdateRejected  # noqa: E402

Options = Mapping[str, Any]

# A write to an object store gives up after WRITE_GRACE_S plus its size at WRITE_FLOOR_BYTES_PER_S
# (2 Mbit/s), and the caller's retries take over. The stores' async clients (aiohttp under s3fs,
# gcsfs and adlfs) time out reading a response but never a write: a store's host that vanishes in
# the middle of an upload would otherwise hold the writer until the kernel gives the connection up
# (about 15 minutes on Linux), with the round's commit or a client's upload stuck in it.
WRITE_GRACE_S = 60.0
WRITE_FLOOR_BYTES_PER_S = 256 * 1024


def _pipe(fs, path: str, data: bytes, **kwargs: Any) -> None:
    """`fs.pipe_file` under the write deadline (fsspec's own: the coroutine is cancelled, and
    `fsspec.exceptions.FSTimeoutError` raised). Local and in-memory files need none."""
    if isinstance(fs, AsyncFileSystem):
        kwargs["timeout"] = WRITE_GRACE_S + len(data) / WRITE_FLOOR_BYTES_PER_S
    fs.pipe_file(path, data, **kwargs)


def filesystem(url: str, options: Options | None = None):
    """The filesystem and in-filesystem path for a URL. Instances are cached by fsspec per
    options, so repeated calls reuse connections."""
    return fsspec.url_to_fs(url, **dict(options or {}))


def write_atomic(url: str, data: bytes | bytearray, options: Options | None = None) -> int:
    """Readers see the whole object or none of it. An object store's PUT already is atomic; a
    local file is written beside its target and renamed over it. A missing bucket (container)
    is created, so a client's first upload needs no setup step."""
    fs, path = filesystem(url, options)
    parent = posixpath.dirname(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        os.replace(tmp, path)  # not fs.mv, which moves *into* a folder standing at `path`
    else:
        _ensure_bucket(fs, path)
        _pipe(fs, path, bytes(data))  # adlfs refuses a bytearray; one copy before a network upload
        fs.invalidate_cache(parent)
    return len(data)


def write_exclusive(url: str, data: bytes | bytearray, options: Options | None = None) -> bool:
    """Create the object only if there is none (True), else leave it alone (False). Atomic on
    each store: a hard link locally, a conditional PUT on S3, GCS and Azure (fsspec's
    `mode="create"`), so two concurrent writers cannot both win."""
    fs, path = filesystem(url, options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    _ensure_bucket(fs, path)
    try:
        _pipe(fs, path, bytes(data), mode="create")
    except FileExistsError:
        return False
    finally:
        fs.invalidate_cache(posixpath.dirname(path))
    return True


def remove(url: str, options: Options | None = None) -> None:
    fs, path = filesystem(url, options)
    fs.rm_file(path)
    fs.invalidate_cache(posixpath.dirname(path))


def _ensure_bucket(fs, path: str) -> None:
    bucket = path.split("/", 1)[0]
    fs.invalidate_cache(bucket)
    if not fs.exists(bucket):
        try:
            fs.mkdir(bucket)
        except FileExistsError:
            pass  # another client created it first


def read_limited(url: str, max_bytes: int, options: Options | None = None) -> bytes:
    """Fetch an object, refusing one over `max_bytes`. The listed size refuses most early, but
    it is only a hint (the object can grow between the two calls, and some filesystems report
    none), so the read itself is a ranged read of `max_bytes + 1`: never more comes in."""
    fs, path = filesystem(url, options)
    fs.invalidate_cache(posixpath.dirname(path))  # another process wrote it since we last listed
    try:
        size = fs.size(path)
        if size is not None and size > max_bytes:
            raise UpdateRejected(Reason.TOO_LARGE, f"{url} is {size} bytes, limit {max_bytes}")
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except FileNotFoundError:
        raise UpdateRejected(Reason.MISSING, f"no object at {url}") from None
    except (IsADirectoryError, NotADirectoryError):
        raise UpdateRejected(Reason.MISSING, f"{url} is not an object") from None
    if len(data) > max_bytes:
        raise UpdateRejected(Reason.TOO_LARGE, f"{url} holds more than {max_bytes} bytes")
    return data


def exists(url: str, options: Options | None = None) -> bool:
    fs, path = filesystem(url, options)
    fs.invalidate_cache(posixpath.dirname(path))
    return fs.exists(path)


def list_prefix(url: str, options: Options | None = None) -> list[str]:
    """Every object under `url`, as full paths of its filesystem (for audits and scans)."""
    fs, path = filesystem(url, options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    return sorted(fs.find(path))
