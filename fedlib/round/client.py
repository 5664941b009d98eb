"""The client's side of a round: train from the global adapter, seal the delta, upload it.

Only ciphertext leaves the client, and only to the client's own bucket.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace

import torch

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
from fedlib.secagg.client import SecureRound
from fedlib.update.chain import ChainSettings, client_filters, send_update, wire_payload
from fedlib.update.report import ClientReport, SaidByClient
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, seal
from fedlib.wire.sealed_stores import CarriedResidual, ResidualStore
from fedlib.wire.serialization import Tensors
from fedlib.wire.storage import Options


def client_seed(federation_seed: int, client: str, round_number: int) -> int:
    """A client's seed for one round: its own draw of data order and rounding, reproducible from
    the federation's seed and no one else's."""
    digest = hashlib.sha256(f"{federation_seed}/{client}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class LocalRound:
    """What one client's round reads, fixed where the task reads the config
    (`tasks.from_config.local_round`): the core below takes this value, never the config.

    `model` is the base model and LoRA shape at this client's rank; `global_rank` the
    federation's, which the delta is padded back to. `parent` is the digest of the global adapter
    trained from (the envelope binds it), `downloaded` the bytes read to start the round, and
    `data_salt` a secret of the client's that keys its data digest (none: no digest)."""

    client: str
    round: int
    federation: str
    update_url: str
    model: ModelKey
    global_rank: int
    plan: TrainingPlan
    eval_batch: int
    chain: ChainSettings
    rounding_seed: int
    parent: str = ""
    downloaded: int = 0
    data_salt: bytes = field(default=b"", repr=False)

    @property
    def private(self) -> bool:
        """Under secure aggregation a client's losses are facts of its data: not logged where the
        orchestrator reads."""
        return self.chain.mask is not None


@dataclass(frozen=True)
class SealedUpdate:
    """A client's encrypted update, ready to upload; only ciphertext leaves the client. With
    error feedback it carries the client's next residual too, sealed for the client alone and
    saved only once the update is uploaded."""

    report: ClientReport
    blob: bytes | bytearray
    residual_blob: bytes | None = None


def train_delta(
    job: LocalRound,
    global_adapter: Tensors,
    shard: Examples | torch.Tensor,
    validation: Examples | torch.Tensor | None = None,
) -> tuple[Tensors, LocalTraining, Validation | None]:
    """Local training from the global adapter (cut to this cloud's LoRA rank); returns trained,
    padded back to the global rank, minus global (over the tensors training changes: with
    FFA-LoRA only the B matrices), and the received adapter's validation score.
    The base model is this process's pooled one (loaded once, adapters swapped), or with
    `clouds[].processes` > 1, one per training process (`fedlib.model.distributed`)."""
    rank = job.model.lora.r
    received = truncate_adapter(global_adapter, job.global_rank, rank)
    plan = job.plan

    def on_step(step: StepProgress) -> None:
        emit(ClientStep(job.client, job.round, step.step, step.steps, None if job.private else step.loss, step.tokens_per_s))

    if plan.processes > 1:
        run = train_in_processes(job.model, received, as_examples(shard), validation, plan, job.eval_batch, on_step)
    else:
        with POOL.lora_model(job.model, received) as model:
            run = score_and_train(model, as_examples(shard), validation, plan, job.eval_batch, on_step)
    local = pad_adapter(run.adapter, global_adapter, job.global_rank, rank)
    trained = trained_part(job.model.lora, global_adapter)
    return {name: local[name] - trained[name] for name in trained}, run.training, run.validation


def train_and_seal(
    job: LocalRound,
    global_adapter: Tensors,
    data: ClientData,
    key: UpdateKey,
    secure: SecureRound | None = None,
    residuals: CarriedResidual | None = None,
) -> SealedUpdate:
    """Train, then send the delta down the update path (`fedlib.update.chain`): the residual of
    the client's last accepted round added back when `residuals` is given, clipped under DP,
    masked (with `secure`) or through the configured codecs, serialised, compressed, sealed.

    The example and step counts, and the client's report (loss, timings, norm, its score of the
    received adapter), travel inside the authenticated payload: a storage provider cannot
    re-weight a client, and the aggregator needs no channel but the client's bucket. The envelope
    binds the round, the secure session and `job.parent`, the digest of the global adapter this
    update was trained from. Under secure aggregation the report holds no figure of the client's
    data (`SaidByClient.for_secure_aggregation`); the data's digest is keyed by `job.data_salt`."""
    started = time.perf_counter()
    steps = job.plan.steps
    shard = data.train
    with measured() as use:
        delta, result, scored = train_delta(job, global_adapter, shard, data.validation)
    norm = update_norm(delta)
    trained = time.perf_counter()
    rounding = torch.Generator().manual_seed(job.rounding_seed)
    carried = residuals.store.load(residuals.carried_from) if residuals is not None else None
    if secure is not None:
        secure = replace(secure, parent=job.parent)  # the release, and its DP noise, are of this parent
    examples = min(len(shard), secure.max_examples) if secure is not None and secure.max_examples else len(shard)
    filters = client_filters(job.chain, job.client, examples, steps, rounding, carried, secure)
    sent = send_update(filters, delta, {"num_examples": str(examples), "local_steps": str(steps)})
    residual = sent.residual if residuals is not None else None
    residual_blob = residuals.store.sealed(job.round, residual) if residuals is not None and residual is not None else None
    said = SaidByClient(
        train_loss=result.mean_loss,
        train_s=trained - started,
        encode_s=time.perf_counter() - trained,
        update_norm=norm,
        bytes_downloaded=job.downloaded,
        validation_loss=scored.loss if scored else None,
        validation_tokens=scored.tokens if scored else 0,
        tokens_per_s=result.tokens_seen / max(trained - started, 1e-9),
        peak_memory_mib=use.peak_memory_mib,
        gpu_memory_mib=use.gpu_memory_mib,
        cpu_util=use.cpu_util,
        data_digest=shard.digest(job.data_salt) if job.data_salt else "",
    )
    if secure is not None:
        said = said.for_secure_aggregation()
    payload = wire_payload(replace(sent, metadata={**sent.metadata, "report": said.to_json()}), job.chain.codecs)
    session = secure.session.id if secure is not None else ""
    blob = seal(payload, key, EnvelopeContext(job.federation, job.round, job.client, session, job.parent))
    emit(ClientTrained(job.client, job.round, None if secure is not None else result.mean_loss))
    report = said.report(job.client, job.round, len(shard), steps, job.update_url, len(blob))
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
