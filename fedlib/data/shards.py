"""Each client's training data, which only that client reads.

Two ways a client gets it. In the real mode each cloud names its own files (`clouds[].data`),
which its client reads with its own credentials and tokenises on its own machine; nobody else
ever opens them. In the simulated mode (one corpus, the demo) the aggregator partitions the
corpus and *distributes* it: each client's blocks, sealed for that client, go into that client's
own bucket, and the client reads that one object. Either way the client's round starts from a
`ClientData`, and its logs say where it came from.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from fedlib.config import FederationConfig
from fedlib.data.own_files import own_examples
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


def partition_digest(config: FederationConfig) -> str:
    """What decides the simulated split: the data, the held-out set, the rule, the seed, the
    clients. Shards are named by it, so a changed config never reads a stale shard."""
    fields = {
        "model": config.model.source,
        "data": config.data.model_dump(mode="json"),
        "evaluation": config.evaluation.model_dump(mode="json"),
        "partition": config.partition.model_dump(mode="json"),
        "seed": config.federation.seed,
        "clouds": [cloud.name for cloud in config.clouds],
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def shard_url(config: FederationConfig, client: str) -> str:
    return config.layout.shard_url(client, partition_digest(config))


def shard_context(config: FederationConfig, client: str) -> EnvelopeContext:
    """What a shard is sealed under: its client, bound to the partition that made it."""
    return EnvelopeContext(config.federation.id, 0, client, f"data/{partition_digest(config)}")


def distribute_shard(
    config: FederationConfig, client: str, train: torch.Tensor, validation: torch.Tensor, key: UpdateKey, options: Options | None
) -> str:
    """Seal `client`'s blocks for it and write them to its bucket (once per partition)."""
    url = shard_url(config, client)
    if not storage.exists(url, options):
        payload = tensors_to_bytes({"train": train, "validation": validation})
        storage.write_atomic(url, seal(payload, key, shard_context(config, client)), options)
    return url


def read_shard(config: FederationConfig, client: str, key: UpdateKey, options: Options | None) -> ClientData:
    """The client's distributed shard, authenticated; block length checked before it is built.
    Kept on the client's own disk once read (a shard never changes: it is named by the
    partition), so a bucket outage later costs the upload, not the round's training data."""
    url = shard_url(config, client)
    cached = config.data_path / "cache" / f"shard-{client}-{partition_digest(config)[:16]}.safetensors"
    if cached.exists():
        tensors = load_file(str(cached))
        return ClientData.of_blocks(tensors["train"], tensors["validation"], url)
    data = _fetch_shard(config, client, key, options, url)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.tmp")
    save_file({"train": data.train.input_ids.contiguous(), "validation": data.validation.input_ids.contiguous()}, str(tmp))
    os.replace(tmp, cached)
    return data


def _fetch_shard(config: FederationConfig, client: str, key: UpdateKey, options: Options | None, url: str) -> ClientData:
    payload = open_sealed(storage.read_limited(url, MAX_SHARD_BYTES, options), key, shard_context(config, client))
    seq_len = config.data.seq_len

    def allowed(name: str, spec: TensorSpec) -> str | None:
        ok = name in ("train", "validation") and len(spec.shape) == 2 and spec.shape[1] == seq_len and spec.dtype == torch.int64
        return None if ok else f"not a [n, {seq_len}] int64 block tensor"

    tensors, _ = load_tensors(payload, "data shard", allowed)
    return ClientData.of_blocks(tensors["train"], tensors.get("validation", torch.empty(0, seq_len, dtype=torch.long)), url)


def own_data(config: FederationConfig, client: str, options: Options | None) -> ClientData:
    """The client's own files (`clouds[].data`, `clouds[].validation`: text or instruction
    records), read with its credentials and tokenised here; cached in its own data_dir."""
    cloud = config.cloud(client)
    readable = dict(options) if options is not None else None
    train = own_examples(config, cloud.data, readable, f"{client}/train")
    return ClientData(train, own_examples(config, cloud.validation, readable, f"{client}/validation"), ", ".join(cloud.data))


def client_data(config: FederationConfig, client: str, key: UpdateKey, options: Options | None) -> ClientData:
    return read_shard(config, client, key, options) if config.simulated else own_data(config, client, options)
