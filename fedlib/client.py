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
from fedlib.manifest import ClientReport, SaidByClient
from fedlib.model import adapter_state
from fedlib.privacy.dp import clip_update_inplace, update_norm
from fedlib.secagg.client import SecureRound, masked_update
from fedlib.serialization import tensors_to_bytes
from fedlib.storage import Options
from fedlib.shards import ClientData
from fedlib.training import LocalTraining, evaluate_loss, train_lora


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


@dataclass(frozen=True)
class Validation:
    """The client's score of the global adapter it received, on its own validation split."""

    loss: float
    tokens: int


def train_delta(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    shard: torch.Tensor,
    steps: int,
    validation: torch.Tensor | None = None,
) -> tuple[Tensors, LocalTraining, Validation | None]:
    """Local training from the global adapter (cut to this cloud's LoRA rank); returns trained,
    padded back to the global rank, minus global, and the received adapter's validation score."""
    rank = config.cloud(client).lora_rank or config.lora.r
    model = load_global_model(config, truncate_adapter(global_adapter, config.lora.r, rank), rank)
    scored = None
    if validation is not None and len(validation):
        loss = evaluate_loss(model, validation, config.evaluation.batch_size)
        scored = Validation(loss, int(validation.shape[0] * (validation.shape[1] - 1)))
    t = config.training
    generator = torch.Generator().manual_seed(client_seed(config, client, round_number))
    slowdown, min_step_s = emulated_pacing(config, client)
    result = train_lora(model, shard, steps, t.batch_size, t.learning_rate, generator, config.proximal_mu, slowdown, min_step_s)
    local = pad_adapter(adapter_state(model), global_adapter, config.lora.r, rank)
    return {name: local[name] - global_adapter[name] for name in global_adapter}, result, scored


def train_and_seal(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    data: ClientData,
    key: UpdateKey,
    secure: SecureRound | None = None,
    residuals: CarriedResidual | None = None,
    local_steps: int | None = None,
    parent: str = "",
    downloaded: int = 0,
) -> SealedUpdate:
    """Train, then seal the delta for the aggregator: masked (with `secure`), or through the
    configured codecs, with the residual of the client's last accepted round added back when
    `residuals` is given.

    The example and step counts, and the client's report (loss, timings, norm, its score of the
    received adapter), travel inside the authenticated payload: a storage provider cannot
    re-weight a client, and the aggregator needs no channel but the client's bucket. The envelope
    binds the round, the secure session and `parent`, the digest of the global adapter this
    update was trained from."""
    started = time.perf_counter()
    t = config.training
    steps = local_steps or t.local_steps
    shard = data.train
    delta, result, scored = train_delta(config, client, round_number, global_adapter, shard, steps, data.validation)
    norm = update_norm(delta)
    chain = config.compression.chain
    if residuals is not None and chain.lossy:
        for name, value in residuals.store.load(residuals.carried_from).items():
            if name in delta and value.shape == delta[name].shape:
                delta[name] = delta[name] + value
    if config.privacy.enabled:  # the unclipped update never leaves the client
        clip_update_inplace(delta, config.privacy.clip_norm)
    trained = time.perf_counter()
    metadata = {"num_examples": str(len(shard)), "local_steps": str(steps)}
    residual_blob = None
    if secure is not None:
        tensors, weight = masked_update(config, client, delta, len(shard), steps, secure)
        metadata["weight"] = str(weight)
    else:
        tensors, metadata["codecs"] = chain.encode(delta)
        if residuals is not None and chain.lossy:
            decoded = chain.decode(tensors, metadata["codecs"], delta)
            residual_blob = residuals.store.sealed(round_number, {n: delta[n] - decoded[n] for n in delta})
    said = SaidByClient(
        train_loss=result.mean_loss,
        train_s=trained - started,
        encode_s=time.perf_counter() - trained,
        update_norm=norm,
        bytes_downloaded=downloaded,
        validation_loss=scored.loss if scored else None,
        validation_tokens=scored.tokens if scored else 0,
    )
    metadata["report"] = said.to_json()
    payload = chain.compress(tensors_to_bytes(tensors, metadata=metadata))
    session = secure.session.id if secure is not None else ""
    blob = seal(payload, key, EnvelopeContext(config.federation.id, round_number, client, session, parent))
    progress.info("client %s round %d trained: loss %.4f", client, round_number, result.mean_loss)
    report = said.report(client, round_number, len(shard), steps, update_url(config, client, round_number), len(blob))
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
    data = ClientData(shard, shard[:0], "<given>")
    return upload_sealed(train_and_seal(config, client, round_number, global_adapter, data, key, parent=parent), options)
