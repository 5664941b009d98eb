"""Each client's training data, which only that client reads.

Two ways a client gets it. In the real mode each cloud names its own files (`clouds[].data`),
which its client reads with its own credentials and tokenises on its own machine; nobody else
ever opens them. In the simulated mode (one corpus, the demo) the aggregator partitions the
corpus and *distributes* it: each client's blocks, sealed for that client, go into that client's
own bucket, and the client reads that one object. Either way the client's round starts from a
`ClientData`, and its logs say where it came from.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedlib.examples import Examples
from fedlib.wire import storage
from fedlib.wire.decode import TensorSpec, load_tensors
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.wire.serialization import tensors_to_bytes
from fedlib.wire.storage import Options

MAX_SHARD_BYTES = 1 << 32


@dataclass(frozen=True)
class ClientData:
    train: Examples
    validation: Examples  # may be empty
    source: str  # what the client read: a URL of its own, for its logs

    @classmethod
    def of_blocks(cls, train: torch.Tensor, validation: torch.Tensor, source: str) -> ClientData:
        return cls(Examples.from_blocks(train), Examples.from_blocks(validation), source)


@dataclass(frozen=True)
class ShardPlace:
    """Where one client's distributed shard lives (`url`), what it is sealed under (`context`:
    its client, bound to the partition that made it), where the client keeps its own copy
    (`cache`), and the block length it must have."""

    url: str
    context: EnvelopeContext
    cache: Path
    seq_len: int


def distribute_shard(place: ShardPlace, train: torch.Tensor, validation: torch.Tensor, key: UpdateKey, options: Options | None) -> str:
    """Seal a client's blocks for it and write them to its bucket (once per partition)."""
    if not storage.exists(place.url, options):
        payload = tensors_to_bytes({"train": train, "validation": validation})
        storage.write_atomic(place.url, seal(payload, key, place.context), options)
    return place.url


def read_shard(place: ShardPlace, key: UpdateKey, options: Options | None) -> ClientData:
    """The client's distributed shard, authenticated; block length checked before it is built.
    Kept on the client's own disk once read (a shard never changes: it is named by the
    partition), so a bucket outage later costs the upload, not the round's training data."""
    if place.cache.exists():
        tensors = load_file(str(place.cache))
        return ClientData.of_blocks(tensors["train"], tensors["validation"], place.url)
    data = _fetch_shard(place, key, options)
    place.cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = place.cache.with_name(f"{place.cache.name}.{uuid.uuid4().hex}.tmp")
    save_file({"train": data.train.input_ids.contiguous(), "validation": data.validation.input_ids.contiguous()}, str(tmp))
    os.replace(tmp, place.cache)
    return data


def _fetch_shard(place: ShardPlace, key: UpdateKey, options: Options | None) -> ClientData:
    payload = open_sealed(storage.read_limited(place.url, MAX_SHARD_BYTES, options), key, place.context)
    seq_len = place.seq_len

    def allowed(name: str, spec: TensorSpec) -> str | None:
        ok = name in ("train", "validation") and len(spec.shape) == 2 and spec.shape[1] == seq_len and spec.dtype == torch.int64
        return None if ok else f"not a [n, {seq_len}] int64 block tensor"

    tensors, _ = load_tensors(payload, "data shard", allowed)
    return ClientData.of_blocks(tensors["train"], tensors.get("validation", torch.empty(0, seq_len, dtype=torch.long)), place.url)
