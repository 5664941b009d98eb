"""What every stage of a federation derives from its validated config: where things live,
the data, the key, the models. The client's side is in `fedlib.client`, the aggregator's in
`fedlib.aggregator`; Prefect tasks call these and nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlib import storage
from fedlib.checkpoint import CheckpointStore
from fedlib.client_state import ResidualStore, RevealLedger
from fedlib.config import FederationConfig
from fedlib.data import BlockSet, cached_blocks, shakespeare_documents, tokenize_blocks, url_documents
from fedlib.envelope import UpdateKey
from fedlib.keys import KeyRing, fingerprint, init_keys, load_keyring
from fedlib.model import adapter_state, attach_lora, load_adapter_state, load_base_model, load_tokenizer
from fedlib.partition import Assignment, partition
from fedlib.secagg.protocol import Session
from fedlib.training import evaluate_loss

Tensors = dict[str, torch.Tensor]
progress = logging.getLogger("fedlib.progress")  # the CLI turns these records into a progress bar


@dataclass(frozen=True)
class FederationData:
    train: BlockSet
    evaluation: torch.Tensor  # [n, seq_len] held-out blocks


def key_folder(config: FederationConfig) -> Path:
    """Beside the aggregator, never in a bucket."""
    return config.data_path / "keys"


def keyring(config: FederationConfig, create: bool = False) -> KeyRing:
    """Every party's keys. `create` makes the missing ones: the embedded default, where one
    machine plays every party; real deployments run `fedlib keys init` per party instead."""
    names = [c.name for c in config.clouds]
    if create:
        init_keys(key_folder(config), names)
    return load_keyring(key_folder(config), names)


def client_update_key(ring: KeyRing, client: str) -> UpdateKey:
    return UpdateKey(ring.client_shared_secret(client), fingerprint(ring.public_key(client)))


def aggregator_update_key(ring: KeyRing, client: str) -> UpdateKey:
    return UpdateKey(ring.aggregator_shared_secret(client), fingerprint(ring.public_key(client)))


def checkpoint_store(config: FederationConfig, ring: KeyRing | None = None) -> CheckpointStore:
    """Manifests are signed with the aggregator's Ed25519 key and verified on every read."""
    ring = ring or keyring(config)
    return CheckpointStore(
        config.checkpoint_url,
        config.federation.id,
        signer=ring.signing_private,
        verifier=ring.signing_public,
        options=config.federation.checkpoint_options,
    )


def secagg_session(config: FederationConfig, round_number: int, session_id: str) -> Session:
    """Everything but the id follows from the config, so only the id travels to the clients."""
    names = tuple(sorted(c.name for c in config.clouds))
    return Session(config.federation.id, round_number, session_id, names, config.secagg_threshold)


def residual_store(config: FederationConfig, ring: KeyRing, client: str, options: storage.Options | None) -> ResidualStore:
    """The client's error-feedback residual: in its own bucket, under a key only it holds."""
    url = storage.join(config.storage_url(config.cloud(client)), config.federation.id, "client-state", f"{client}.residual")
    key = UpdateKey(ring.client_derived_secret(client, "client-state"), fingerprint(ring.public_key(client)))
    return ResidualStore(url, key, config.federation.id, client, options)


def reveal_ledger(config: FederationConfig, ring: KeyRing, client: str, options: storage.Options | None) -> RevealLedger:
    """What the client revealed per secure-aggregation session: in its own bucket, its own key."""
    root = storage.join(config.storage_url(config.cloud(client)), config.federation.id, "client-state", f"{client}-secagg")
    key = UpdateKey(ring.client_derived_secret(client, "secagg-reveals"), fingerprint(ring.public_key(client)))
    return RevealLedger(root, key, config.federation.id, client, options)


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


def load_global_model(config: FederationConfig, adapter: Tensors | None, rank: int | None = None):
    """Base model with LoRA attached (of `rank`, the global rank unless given) and, if given,
    the adapter's weights loaded."""
    settings = config.lora if rank is None else config.lora.model_copy(update={"r": rank})
    model = attach_lora(load_base_model(config.model.source), settings, config.federation.seed)
    if adapter is not None:
        load_adapter_state(model, adapter)
    return model


def evaluate_adapter(config: FederationConfig, adapter: Tensors | None, blocks: torch.Tensor) -> float:
    """Held-out loss; `adapter=None` scores the base model alone (round 0)."""
    model = load_base_model(config.model.source) if adapter is None else load_global_model(config, adapter)
    return evaluate_loss(model, blocks, config.evaluation.batch_size)
