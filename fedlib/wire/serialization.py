"""Tensors to bytes and back with safetensors: a JSON header and raw buffers, never pickle.

Reading goes through the decode boundary (`fedlib.wire.decode`), so a payload that is not what it
claims is a named rejection, never an exception from deeper in."""

from __future__ import annotations

import torch
from safetensors.torch import save

from fedlib.wire.decode import load_tensors, safetensors_layout

Tensors = dict[str, torch.Tensor]


def tensors_to_bytes(tensors: Tensors, metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)


def bytes_to_tensors(data: bytes) -> Tensors:
    """Parse bytes that passed authentication; a parse failure is still a named rejection."""
    return load_tensors(data)[0]


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors payload, the whole header checked first."""
    return safetensors_layout(data).metadata
