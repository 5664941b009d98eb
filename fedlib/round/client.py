"""The client's side of a round: train from the global adapter, seal the delta, upload it.

Only ciphertext leaves the client, and only to the client's own bucket.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import torch

from fedlib.config import FederationConfig
from fedlib.data.shards import ClientData
from fedlib.examples import Examples, as_examples
from fedlib.model.base import trained_part
from fedlib.model.distributed import score_and_train, train_in_processes
from fedlib.model.pool import POOL, ModelKey
from fedlib.model.ranks import pad_adapter, truncate_adapter
from fedlib.model.system_use import measured
from fedlib.model.training import LocalTraining, StepProgress, TrainingPlan, Validation
from fedlib.privacy.dp import update_norm
from fedlib.progress import ClientStep, ClientTrained, emit
from fedlib.round.planning import emulated_pacing
from fedlib.secagg.client import SecureRound
from fedlib.update.chain import ChainSettings, client_filters, send_update, wire_payload
from fedlib.update.report import ClientReport, SaidByClient
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, seal
from fedlib.wire.sealed_stores import CarriedResidual, ResidualStore
from fedlib.wire.serialization import Tensors
from fedlib.wire.storage import Options


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


def training_plan(config: FederationConfig, client: str, round_number: int, steps: int) -> TrainingPlan:
    """The part of the config one client's local run uses, with its seed for this round and
    its cloud's pacing and process count."""
    t = config.training
    slowdown, min_step_s = emulated_pacing(config.training, config.profiles, client)
    return TrainingPlan(
        steps=steps,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        seed=client_seed(config, client, round_number) % 2**32,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_grad_norm=t.max_grad_norm,
        lr_scheduler=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        gradient_checkpointing=t.gradient_checkpointing,
        precision=t.placement.dtype,
        proximal_mu=config.proximal_mu,
        slowdown=slowdown,
        min_step_s=min_step_s,
        processes=config.cloud(client).processes,
    )


def train_delta(
    config: FederationConfig,
    client: str,
    round_number: int,
    global_adapter: Tensors,
    shard: Examples | torch.Tensor,
    steps: int,
    validation: Examples | torch.Tensor | None = None,
) -> tuple[Tensors, LocalTraining, Validation | None]:
    """Local training from the global adapter (cut to this cloud's LoRA rank); returns trained,
    padded back to the global rank, minus global (over the tensors training changes: with
    FFA-LoRA only the B matrices), and the received adapter's validation score.
    The base model is this process's pooled one (loaded once, adapters swapped), or with
    `clouds[].processes` > 1, one per training process (`fedlib.model.distributed`)."""
    rank = config.cloud(client).lora_rank or config.lora.r
    received = truncate_adapter(global_adapter, config.lora.r, rank)
    plan = training_plan(config, client, round_number, steps)
    batch = config.evaluation.batch_size

    private = config.secure_aggregation.enabled  # a client's losses are facts of its data: not logged where the orchestrator reads

    def on_step(step: StepProgress) -> None:
        emit(ClientStep(client, round_number, step.step, step.steps, None if private else step.loss, step.tokens_per_s))

    key = ModelKey.of(config.model.source, config.training, config.lora, config.federation.seed, rank)
    if plan.processes > 1:
        run = train_in_processes(key, received, as_examples(shard), validation, plan, batch, on_step)
    else:
        with POOL.lora_model(key, received) as model:
            run = score_and_train(model, as_examples(shard), validation, plan, batch, on_step)
    local = pad_adapter(run.adapter, global_adapter, config.lora.r, rank)
    trained = trained_part(config.lora, global_adapter)
    return {name: local[name] - trained[name] for name in trained}, run.training, run.validation


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
    data_salt: bytes = b"",
) -> SealedUpdate:
    """Train, then send the delta down the update path (`fedlib.update.chain`): the residual of
    the client's last accepted round added back when `residuals` is given, clipped under DP,
    masked (with `secure`) or through the configured codecs, serialised, compressed, sealed.

    The example and step counts, and the client's report (loss, timings, norm, its score of the
    received adapter), travel inside the authenticated payload: a storage provider cannot
    re-weight a client, and the aggregator needs no channel but the client's bucket. The envelope
    binds the round, the secure session and `parent`, the digest of the global adapter this
    update was trained from. Under secure aggregation the report holds no figure of the client's
    data (`SaidByClient.for_secure_aggregation`); the data's digest is keyed by `data_salt`, a
    secret of the client's (none without one)."""
    started = time.perf_counter()
    t = config.training
    steps = local_steps or t.local_steps
    shard = data.train
    with measured() as use:
        delta, result, scored = train_delta(config, client, round_number, global_adapter, shard, steps, data.validation)
    norm = update_norm(delta)
    trained = time.perf_counter()
    rounding = torch.Generator().manual_seed(client_seed(config, client, round_number) ^ 0x5EED)
    carried = residuals.store.load(residuals.carried_from) if residuals is not None and config.lossy_updates else None
    if secure is not None:
        secure = replace(secure, parent=parent)  # the release, and its DP noise, are of this parent
    examples = min(len(shard), secure.max_examples) if secure is not None and secure.max_examples else len(shard)
    filters = client_filters(ChainSettings.of(config), client, examples, steps, rounding, carried, secure)
    sent = send_update(filters, delta, {"num_examples": str(examples), "local_steps": str(steps)})
    residual = sent.residual if residuals is not None else None
    residual_blob = residuals.store.sealed(round_number, residual) if residuals is not None and residual is not None else None
    said = SaidByClient(
        train_loss=result.mean_loss,
        train_s=trained - started,
        encode_s=time.perf_counter() - trained,
        update_norm=norm,
        bytes_downloaded=downloaded,
        validation_loss=scored.loss if scored else None,
        validation_tokens=scored.tokens if scored else 0,
        tokens_per_s=result.tokens_seen / max(trained - started, 1e-9),
        peak_memory_mib=use.peak_memory_mib,
        gpu_memory_mib=use.gpu_memory_mib,
        cpu_util=use.cpu_util,
        data_digest=shard.digest(data_salt) if data_salt else "",
    )
    if secure is not None:
        said = said.for_secure_aggregation()
    payload = wire_payload(replace(sent, metadata={**sent.metadata, "report": said.to_json()}), config.compression.chain)
    session = secure.session.id if secure is not None else ""
    blob = seal(payload, key, EnvelopeContext(config.federation.id, round_number, client, session, parent))
    emit(ClientTrained(client, round_number, None if secure is not None else result.mean_loss))
    report = said.report(client, round_number, len(shard), steps, config.layout.update_url(client, round_number), len(blob))
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
    data = ClientData.of_blocks(shard, shard[:0], "<given>")
    return upload_sealed(train_and_seal(config, client, round_number, global_adapter, data, key, parent=parent), options)
