"""The federation's symmetric key, kept beside the aggregator and never in a bucket."""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def load_or_create_key(path: Path) -> bytes:
    """32 random bytes in a 0600 file; created once, atomically, so concurrent callers agree."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # unique per thread, not just per process
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(os.urandom(32))
        try:
            os.link(tmp, path)  # fails if another process won the race; then use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{path}: a federation key must be exactly 32 bytes, found {len(key)}")
    return key
