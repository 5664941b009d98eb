"""What a federation's stages compute, as plain functions of a validated config.

Client side: `train_client_update` (train from the global adapter, seal the delta, upload it to
the client's own bucket). Aggregator side: `open_client_update` and `aggregate_updates`
(download, authenticate, decrypt, check, combine). Prefect tasks call these and nothing else.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from fedlib import storage
from fedlib.checkpoint import CheckpointStore
from fedlib.config import FederationConfig
from fedlib.data import BlockSet, cached_blocks, shakespeare_documents, tokenize_blocks, url_documents
from fedlib.envelope import EnvelopeContext, open_sealed, seal
from fedlib.keys import load_or_create_key
from fedlib.model import adapter_state, attach_lora, load_adapter_state, load_base_model, load_tokenizer
from fedlib.partition import Assignment, partition
from fedlib.rejection import QuorumNotMet, Reason, UpdateRejected
from fedlib.serialization import bytes_to_tensors, read_metadata, tensors_to_bytes
from fedlib.storage import Options
from fedlib.strategies import ClientUpdate, make_strategy
from fedlib.training import evaluate_loss, train_lora
from fedlib.validation import check_update

Tensors = dict[str, torch.Tensor]
progress = logging.getLogger("fedlib.progress")  # the CLI turns these records into a progress bar


@dataclass(frozen=True)
class FederationData:
    train: BlockSet
    evaluation: torch.Tensor  # [n, seq_len] held-out blocks


def checkpoint_store(config: FederationConfig) -> CheckpointStore:
    return CheckpointStore(config.checkpoint_url)


def key_file(config: FederationConfig) -> Path:
    """Beside the aggregator, never in a bucket."""
    return config.data_path / "keys" / "federation.key"


def federation_key(config: FederationConfig) -> bytes:
    return load_or_create_key(key_file(config))


def update_url(config: FederationConfig, client: str, round_number: int) -> str:
    cloud = config.cloud(client)
    return storage.join(config.storage_url(cloud), config.federation.id, f"round-{round_number:04d}", f"{client}.update")


def load_data(config: FederationConfig) -> FederationData:
    """Tokenised blocks, cached on disk; held-out documents go to evaluation only."""
    cfg = config.data
    key = f"{config.model.source}|{cfg.corpus}|{cfg.urls}|{cfg.seq_len}"

    def build() -> BlockSet:
        docs = shakespeare_documents() if cfg.corpus == "shakespeare" else url_documents(cfg.urls)
        return tokenize_blocks(docs, load_tokenizer(config.model.source), cfg.seq_len)

    blocks = cached_blocks(config.data_path / "cache", key, build)
    held_out = set(config.evaluation.documents)
    unknown = held_out - set(blocks.document_ids)
    if unknown:
        raise ValueError(f"evaluation.documents: {sorted(unknown)} are not documents of the corpus")
    is_eval = torch.tensor([blocks.document_ids[d] in held_out for d in blocks.block_document.tolist()])
    train_index = torch.nonzero(~is_eval).flatten()
    train = BlockSet(
        tokens=blocks.tokens[train_index],
        block_document=blocks.block_document[train_index],
        document_ids=blocks.document_ids,
        document_groups=blocks.document_groups,
    )
    evaluation = blocks.tokens[is_eval][: config.evaluation.max_blocks]
    if len(evaluation) == 0:
        raise ValueError("evaluation.documents: the held-out documents yield no block")
    return FederationData(train=train, evaluation=evaluation)


def partition_clients(config: FederationConfig, data: FederationData) -> dict[str, list[int]]:
    spec = config.partition
    labels = data.train.labels(spec.by)
    parts: Assignment = partition(labels, len(config.clouds), spec.kind, spec.alpha, config.federation.seed)
    return {cloud.name: part for cloud, part in zip(config.clouds, parts)}


def initial_adapter(config: FederationConfig) -> Tensors:
    return adapter_state(attach_lora(load_base_model(config.model.source), config.lora, config.federation.seed))


def load_global_model(config: FederationConfig, adapter: Tensors | None):
    """Base model with LoRA attached and, if given, the global adapter's weights loaded."""
    model = attach_lora(load_base_model(config.model.source), config.lora, config.federation.seed)
    if adapter is not None:
        load_adapter_state(model, adapter)
    return model


def evaluate_adapter(config: FederationConfig, adapter: Tensors | None, blocks: torch.Tensor) -> float:
    """Held-out loss; `adapter=None` scores the base model alone (round 0)."""
    model = load_base_model(config.model.source) if adapter is None else load_global_model(config, adapter)
    return evaluate_loss(model, blocks, config.evaluation.batch_size)


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


def client_seed(config: FederationConfig, client: str, round_number: int) -> int:
    digest = hashlib.sha256(f"{config.federation.seed}/{client}/{round_number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SealedUpdate:
    """A client's encrypted update, ready to upload; only ciphertext leaves the client."""

    report: ClientReport
    blob: bytes


def train_and_seal(
    config: FederationConfig, client: str, round_number: int, global_adapter: Tensors, shard: torch.Tensor, key: bytes
) -> SealedUpdate:
    """Train from the global adapter, then seal the delta for the aggregator.

    The example count travels inside the authenticated payload so a storage provider cannot
    re-weight a client."""
    started = time.perf_counter()
    model = load_global_model(config, global_adapter)
    t = config.training
    generator = torch.Generator().manual_seed(client_seed(config, client, round_number))
    result = train_lora(model, shard, t.local_steps, t.batch_size, t.learning_rate, generator)
    local = adapter_state(model)
    delta = {name: local[name] - global_adapter[name] for name in global_adapter}
    trained = time.perf_counter()
    payload = tensors_to_bytes(delta, metadata={"num_examples": str(len(shard)), "train_loss": repr(result.mean_loss)})
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
    key: bytes,
    options: Options | None = None,
) -> ClientReport:
    """Both client stages in one call, for callers without an orchestrator."""
    return upload_sealed(train_and_seal(config, client, round_number, global_adapter, shard, key), options)


def open_client_update(
    blob: bytes, key: bytes, ctx: EnvelopeContext, template: Tensors
) -> ClientUpdate:
    """Authenticate, decrypt, parse and check one update; any failure is an `UpdateRejected`."""
    payload = open_sealed(blob, key, ctx)
    meta = read_metadata(payload)
    tensors = bytes_to_tensors(payload)
    check_update(tensors, template)
    try:
        examples = int(meta["num_examples"])
        if examples <= 0:
            raise ValueError
    except (KeyError, ValueError):
        raise UpdateRejected(Reason.MALFORMED, "num_examples missing or not a positive integer") from None
    return ClientUpdate(client=ctx.client, num_examples=examples, delta=tensors)


@dataclass
class AggregationReport:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, dict[str, str]] = field(default_factory=dict)  # client -> {reason, detail}
    download_decrypt_s: float = 0.0
    aggregate_s: float = 0.0

    def reject(self, client: str, reason: Reason, detail: str) -> None:
        self.rejected[client] = {"reason": reason.value, "detail": detail}
        progress.warning("client %s rejected (%s): %s", client, reason.value, detail)

    def as_dict(self) -> dict:
        return asdict(self)


def aggregate_updates(
    config: FederationConfig,
    round_number: int,
    global_adapter: Tensors,
    clients: Sequence[str],
    failed: dict[str, str],
    key: bytes,
    storage_options: Mapping[str, Options] | None = None,
) -> tuple[Tensors, AggregationReport]:
    """Stream each expected client's object through `open_client_update` into the strategy.

    Rejected updates are recorded and skipped; the round fails only if fewer than
    `aggregation.min_clients` remain."""
    report = AggregationReport()
    for client, why in failed.items():
        report.reject(client, Reason.CLIENT_FAILED, why)

    def accepted_updates() -> Iterator[ClientUpdate]:
        for client in clients:
            if client in failed:
                continue
            started = time.perf_counter()
            try:
                url = update_url(config, client, round_number)
                options = (storage_options or {}).get(client)
                blob = storage.read_limited(url, config.aggregation.max_update_bytes, options)
                update = open_client_update(blob, key, EnvelopeContext(config.federation.id, round_number, client), global_adapter)
            except UpdateRejected as err:
                report.reject(client, err.reason, err.detail)
                continue
            finally:
                report.download_decrypt_s += time.perf_counter() - started
            report.accepted.append(client)
            yield update

    started = time.perf_counter()
    strategy = make_strategy(config.aggregation.strategy)
    try:
        new_adapter = strategy.aggregate(round_number, global_adapter, accepted_updates())
    except ValueError:
        if report.accepted:
            raise
        new_adapter = None  # no update survived; reported as a quorum failure below
    report.aggregate_s = time.perf_counter() - started - report.download_decrypt_s
    if len(report.accepted) < config.aggregation.min_clients or new_adapter is None:
        reasons = ", ".join(f"{c}: {r['reason']}" for c, r in report.rejected.items()) or "none"
        raise QuorumNotMet(
            f"round {round_number}: {len(report.accepted)} of {len(clients)} updates accepted, "
            f"aggregation.min_clients={config.aggregation.min_clients} (rejected: {reasons})"
        )
    return new_adapter, report

