"""Tensors to bytes and back with safetensors: a JSON header and raw buffers, never pickle."""

from __future__ import annotations

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from fedlib.rejection import Reason, UpdateRejected

Tensors = dict[str, torch.Tensor]


def tensors_to_bytes(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def bytes_to_tensors(data: bytes) -> Tensors:
    """Parse bytes that passed authentication; a parse failure is still a named rejection."""
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise UpdateRejected(Reason.MALFORMED, f"not a safetensors payload: {err}") from None


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload (its header is length-prefixed JSON)."""
    import json
    import struct

    try:
        (size,) = struct.unpack_from("<Q", data, 0)
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a mapping")
        return {str(k): str(v) for k, v in meta.items()}
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise UpdateRejected(Reason.MALFORMED, f"unreadable safetensors header: {err}") from None
