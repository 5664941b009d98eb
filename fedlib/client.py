"""The client's side of a round: train from the global adapter, seal the delta, upload it.

Only ciphertext leaves the client, and only to the client's own bucket.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import torch

from fedlib import storage
from fedlib.config import FederationConfig
from fedlib.envelope import EnvelopeContext, UpdateKey, seal
from fedlib.federation import Tensors, load_global_model, progress, update_url
from fedlib.model import adapter_state
from fedlib.privacy.dp import clip_update_inplace, update_norm
from fedlib.secagg.client import SecureRound, masked_update
from fedlib.serialization import tensors_to_bytes
from fedlib.storage import Options
from fedlib.training import train_lora


@dataclass(frozen=True)
class ClientReport:
    client: str
    round: int
    num_examples: int
    train_loss: float
    bytes_uploaded: int
    object_url: str
    train_s: float
    encrypt_upload_s: float
    update_norm: float  # L2 norm of the delta before any clipping: what DP's clip_norm is tuned against


def client_seed(config: FederationConfig, client: str, round_number: int) -> int:
    digest = hashlib.sha256(f"{config.federation.seed}/{client}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SealedUpdate:
    """A client's encrypted update, ready to upload; only ciphertext leaves the client."""

    report: ClientReport
    blob: bytes | bytearray


def train_and_seal(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    shard: torch.Tensor,
    key: UpdateKey,
    secure: SecureRound | None = None,
) -> SealedUpdate:
    """Train from the global adapter, then seal the delta (masked, with `secure`) for the
    aggregator.

    The example count travels inside the authenticated payload so a storage provider cannot
    re-weight a client."""
    started = time.perf_counter()
    model = load_global_model(config, global_adapter)
    t = config.training
    generator = torch.Generator().manual_seed(client_seed(config, client, round_number))
    result = train_lora(model, shard, t.local_steps, t.batch_size, t.learning_rate, generator)
    local = adapter_state(model)
    delta = {name: local[name] - global_adapter[name] for name in global_adapter}
    norm = update_norm(delta)
    if config.privacy.enabled:  # the unclipped update never leaves the client
        clip_update_inplace(delta, config.privacy.clip_norm)
    trained = time.perf_counter()
    metadata = {"num_examples": str(len(shard)), "train_loss": repr(result.mean_loss)}
    if secure is not None:
        delta, weight = masked_update(config, client, delta, len(shard), secure)
        metadata["weight"] = str(weight)
    payload = tensors_to_bytes(delta, metadata=metadata)
    blob = seal(payload, key, EnvelopeContext(config.federation.id, round_number, client))
    progress.info("client %s round %d trained: loss %.4f", client, round_number, result.mean_loss)
    report = ClientReport(
        client=client,
        round=round_number,
        num_examples=len(shard),
        train_loss=result.mean_loss,
        bytes_uploaded=len(blob),
        object_url=update_url(config, client, round_number),
        train_s=trained - started,
        encrypt_upload_s=time.perf_counter() - trained,
        update_norm=norm,
    )
    return SealedUpdate(report=report, blob=blob)


def upload_sealed(sealed: SealedUpdate, options: Options | None = None) -> ClientReport:
    """Write the ciphertext to the client's own bucket; the report gains the upload time."""
    started = time.perf_counter()
    storage.write_atomic(sealed.report.object_url, sealed.blob, options)
    seconds = sealed.report.encrypt_upload_s + time.perf_counter() - started
    return replace(sealed.report, encrypt_upload_s=seconds)


def train_client_update(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    shard: torch.Tensor,
    key: UpdateKey,
    options: Options | None = None,
) -> ClientReport:
    """Both client stages in one call, for callers without an orchestrator."""
    return upload_sealed(train_and_seal(config, client, round_number, global_adapter, shard, key), options)
