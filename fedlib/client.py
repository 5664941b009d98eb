"""The client's side of a round: train from the global adapter, seal the delta, upload it.

Only ciphertext leaves the client, and only to the client's own bucket.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import torch

from fedlib import storage
from fedlib.client_state import CarriedResidual, ResidualStore
from fedlib.config import FederationConfig
from fedlib.envelope import EnvelopeContext, UpdateKey, seal
from fedlib.federation import Tensors, load_global_model, progress, update_url
from fedlib.heterogeneity import emulated_pacing
from fedlib.lora_ranks import pad_adapter, truncate_adapter
from fedlib.manifest import ClientReport
from fedlib.model import adapter_state
from fedlib.privacy.dp import clip_update_inplace, update_norm
from fedlib.secagg.client import SecureRound, masked_update
from fedlib.serialization import tensors_to_bytes
from fedlib.storage import Options
from fedlib.training import LocalTraining, train_lora


def client_seed(config: FederationConfig, client: str, round_number: int) -> int:
    digest = hashlib.sha256(f"{config.federation.seed}/{client}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SealedUpdate:
    """A client's encrypted update, ready to upload; only ciphertext leaves the client. With
    error feedback it carries the client's next residual too, sealed for the client alone and
    saved only once the update is uploaded."""

    report: ClientReport
    blob: bytes | bytearray
    residual_blob: bytes | None = None


def train_delta(
    config: FederationConfig, client: str, round_number: int, global_adapter: Tensors, shard: torch.Tensor, steps: int
) -> tuple[Tensors, LocalTraining]:
    """Local training from the global adapter (cut to this cloud's LoRA rank); returns trained,
    padded back to the global rank, minus global."""
    rank = config.cloud(client).lora_rank or config.lora.r
    model = load_global_model(config, truncate_adapter(global_adapter, config.lora.r, rank), rank)
    t = config.training
    generator = torch.Generator().manual_seed(client_seed(config, client, round_number))
    slowdown, min_step_s = emulated_pacing(config, client)
    result = train_lora(model, shard, steps, t.batch_size, t.learning_rate, generator, config.proximal_mu, slowdown, min_step_s)
    local = pad_adapter(adapter_state(model), global_adapter, config.lora.r, rank)
    return {name: local[name] - global_adapter[name] for name in global_adapter}, result


def train_and_seal(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    shard: torch.Tensor,
    key: UpdateKey,
    secure: SecureRound | None = None,
    residuals: CarriedResidual | None = None,
    local_steps: int | None = None,
    parent: str = "",
) -> SealedUpdate:
    """Train, then seal the delta for the aggregator: masked (with `secure`), or through the
    configured codecs, with the residual of the client's last accepted round added back when
    `residuals` is given.

    The example and step counts travel inside the authenticated payload so a storage provider
    cannot re-weight a client; the envelope binds the round, the secure session and `parent`,
    the digest of the global adapter this update was trained from."""
    started = time.perf_counter()
    t = config.training
    steps = local_steps or t.local_steps
    delta, result = train_delta(config, client, round_number, global_adapter, shard, steps)
    norm = update_norm(delta)
    chain = config.compression.chain
    if residuals is not None and chain.lossy:
        for name, value in residuals.store.load(residuals.carried_from).items():
            if name in delta and value.shape == delta[name].shape:
                delta[name] = delta[name] + value
    if config.privacy.enabled:  # the unclipped update never leaves the client
        clip_update_inplace(delta, config.privacy.clip_norm)
    trained = time.perf_counter()
    metadata = {"num_examples": str(len(shard)), "local_steps": str(steps), "train_loss": repr(result.mean_loss)}
    residual_blob = None
    if secure is not None:
        tensors, weight = masked_update(config, client, delta, len(shard), steps, secure)
        metadata["weight"] = str(weight)
    else:
        tensors, metadata["codecs"] = chain.encode(delta)
        if residuals is not None and chain.lossy:
            decoded = chain.decode(tensors, metadata["codecs"], delta)
            residual_blob = residuals.store.sealed(round_number, {n: delta[n] - decoded[n] for n in delta})
    payload = chain.compress(tensors_to_bytes(tensors, metadata=metadata))
    session = secure.session.id if secure is not None else ""
    blob = seal(payload, key, EnvelopeContext(config.federation.id, round_number, client, session, parent))
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
        local_steps=steps,
    )
    return SealedUpdate(report=report, blob=blob, residual_blob=residual_blob)


def upload_sealed(sealed: SealedUpdate, options: Options | None = None, residuals: ResidualStore | None = None) -> ClientReport:
    """Write the ciphertext to the client's own bucket (then the residual, so that a failed
    upload leaves last round's residual in place); the report gains the upload time."""
    started = time.perf_counter()
    storage.write_atomic(sealed.report.object_url, sealed.blob, options)
    if sealed.residual_blob is not None and residuals is not None:
        residuals.save(sealed.residual_blob)
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
    parent: str = "",
) -> ClientReport:
    """Both client stages in one call, for callers without an orchestrator."""
    return upload_sealed(train_and_seal(config, client, round_number, global_adapter, shard, key, parent=parent), options)
