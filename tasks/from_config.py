"""The config read at the task boundary: what each party builds from its validated config
(its keys, its stores, the data, the models), so that the core below takes plain values and
sections. Tasks, flows, the CLI and the split server's process call these; nothing in `fedlib/`
does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlib.config import FederationConfig
from fedlib.data.corpus import BlockSet, cached_blocks, shakespeare_documents, tokenize_blocks, url_documents
from fedlib.data.own_files import own_examples
from fedlib.data.partition import Assignment, partition
from fedlib.data.shards import ClientData, ShardPlace, read_shard
from fedlib.examples import Examples
from fedlib.model.base import attach_lora, load_adapter_state, load_base_model, load_tokenizer, trained_part
from fedlib.model.pool import POOL, ModelKey
from fedlib.model.training import TrainingPlan, evaluate_loss
from fedlib.privacy.policy import require_policy
from fedlib.round.aggregator import aggregate_updates, build_strategy, update_limit
from fedlib.round.broadcast import NextGlobal, Received, next_global, receive_global
from fedlib.round.checkpoint import CheckpointStore
from fedlib.round.client import LocalRound, client_seed
from fedlib.round.manifest import ManifestHead
from fedlib.round.planning import emulated_pacing
from fedlib.secagg.client import MaskSettings
from fedlib.secagg.protocol import Session
from fedlib.secagg.quantised import Codes, code_scale
from fedlib.secagg.weights import WeightRule
from fedlib.strategies import Strategy
from fedlib.update.chain import ChainSettings, Expected
from fedlib.update.intake import AggregationReport, RoundIntake
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey
from fedlib.wire.keys import AGGREGATOR, KeyRing, fingerprint, init_keys, load_keyring, party_keyring, read_key_source
from fedlib.wire.outbox import Outbox
from fedlib.wire.sealed_stores import HeldGlobal, ResidualStore, RevealLedger
from fedlib.wire.trust import reveal_folder, trust_record
from tasks.party_policy import offered, pinned_policy

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FederationData:
    """The simulated mode's corpus, as the aggregator holds it before distributing it."""

    train: BlockSet
    held_out: torch.Tensor  # [n, seq_len]: every block of the held-out documents
    max_blocks: int  # the first this many are the aggregator's evaluation set
    held_out_names: tuple[str, ...] = ()  # the documents they come from

    @property
    def evaluation(self) -> torch.Tensor:
        return self.held_out[: self.max_blocks]

    def validation(self, index: int, clients: int, count: int) -> torch.Tensor:
        """Client `index`'s validation split: held-out blocks the aggregator does not score,
        dealt round-robin, at most `count`."""
        return self.held_out[self.max_blocks + index :: clients][:count]


def key_folder(config: FederationConfig) -> Path:
    """Beside the aggregator, never in a bucket."""
    return config.data_path / "keys"


def keyring(config: FederationConfig, party: str | None = None, create: bool = False, read_secret=None) -> KeyRing:
    """The keys this process may hold. With a `keyring` section (each party on its own machine):
    every public key from the config, and `party`'s own private key from its key source (none
    for `party=None`, which can seal for the aggregator and verify manifests only), provided the
    party trusted exactly these public keys on this machine (`fedlib.wire.trust`). Without one, the
    embedded default: every party's keys in `data_dir/keys`, made by `create`."""
    if config.keyring is None:
        names = [c.name for c in config.clouds]
        if create:
            init_keys(key_folder(config), names)
        return load_keyring(key_folder(config), names)
    publics = config.keyring.publics
    if party is None:
        return party_keyring(publics, None, None)  # holds no secret: nothing to redirect
    ring = party_keyring(publics, party, read_key_source(party_key_source(config, party), party, read_secret))
    record = trust_record(publics, party)
    record.require(publics, party)
    require_policy(pinned_policy(config, party), offered(config), party, str(record.path))
    return ring


def party_key_source(config: FederationConfig, party: str) -> str:
    """Where `party`'s private key is on its machine: its cloud's `key_source`, else the keyring's."""
    assert config.keyring is not None
    source = config.keyring.key_source
    return source if party == AGGREGATOR else config.cloud(party).key_source or source


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
    return Session(config.federation.id, round_number, session_id, names, config.secagg_threshold, config.secagg_min_survivors)


def residual_store(config: FederationConfig, ring: KeyRing, client: str, options: storage.Options | None) -> ResidualStore:
    """The client's error-feedback residual: in its own bucket, under a key only it holds."""
    url = config.layout.client_state_url(client, "residual")
    key = UpdateKey(ring.client_derived_secret(client, "client-state"), fingerprint(ring.public_key(client)))
    return ResidualStore(url, key, config.federation.id, client, options)


def held_global(config: FederationConfig, ring: KeyRing, client: str, options: storage.Options | None) -> HeldGlobal:
    """The last global adapter the client rebuilt: in its own bucket, under a key only it holds."""
    url = config.layout.client_state_url(client, "global")
    key = UpdateKey(ring.client_derived_secret(client, "held-global"), fingerprint(ring.public_key(client)))
    return HeldGlobal(url, key, config.federation.id, client, options)


def reveal_ledger(config: FederationConfig, ring: KeyRing, client: str) -> RevealLedger:
    """What the client revealed per secure-aggregation session: on its own machine, under its own
    key's fingerprint (`fedlib.wire.trust`), so that no request, config or bucket can point it at an
    empty ledger."""
    own = fingerprint(ring.public_key(client))
    key = UpdateKey(ring.client_derived_secret(client, "secagg-reveals"), own)
    return RevealLedger(reveal_folder(own).as_uri(), key, config.federation.id, client, None)


def round_folder(config: FederationConfig, client: str, round_number: int) -> str:
    """What `client` writes in round `round_number`, in its own bucket."""
    return config.layout.round_folder(client, round_number)


def update_url(config: FederationConfig, client: str, round_number: int) -> str:
    return config.layout.update_url(client, round_number)


def outbox(config: FederationConfig, client: str, round_number: int, key: UpdateKey, options: storage.Options | None) -> Outbox:
    """The client's messages to the aggregator this round; `key` is either side's update key."""
    return Outbox(round_folder(config, client, round_number), config.federation.id, round_number, client, key, options)


def load_data(config: FederationConfig) -> FederationData:
    """Tokenised blocks, cached on disk; held-out documents go to evaluation only."""
    cfg = config.data
    key = f"{config.model.source}|{cfg.corpus}|{cfg.urls}|{cfg.seq_len}"

    def build() -> BlockSet:
        docs = shakespeare_documents() if cfg.corpus == "shakespeare" else url_documents(cfg.urls)
        return tokenize_blocks(docs, load_tokenizer(config.model.source), cfg.seq_len)

    blocks = cached_blocks(config.data_path / "cache", key, build)
    names = held_out_documents(config, blocks)
    held_out_set = set(names)
    unknown = held_out_set - set(blocks.document_ids)
    if unknown:
        raise ValueError(f"evaluation.documents: {sorted(unknown)} are not documents of the corpus")
    is_eval = torch.tensor([blocks.document_ids[d] in held_out_set for d in blocks.block_document.tolist()])
    train_index = torch.nonzero(~is_eval).flatten()
    train = BlockSet(
        tokens=blocks.tokens[train_index],
        block_document=blocks.block_document[train_index],
        document_ids=blocks.document_ids,
        document_groups=blocks.document_groups,
    )
    held_out = blocks.tokens[is_eval]
    if len(held_out) == 0:
        raise ValueError("evaluation.documents: the held-out documents yield no block")
    return FederationData(train=train, held_out=held_out, max_blocks=config.evaluation.max_blocks, held_out_names=names)


def held_out_documents(config: FederationConfig, blocks: BlockSet) -> tuple[str, ...]:
    """The documents no client trains on: `evaluation.documents` as named, `macbeth` for the
    shipped corpus, or a seeded `evaluation.held_out_share` of the user's own documents."""
    named = config.evaluation.documents
    if named is not None:
        return named
    if config.data.corpus == "shakespeare":
        return ("macbeth",)
    return blocks.held_out_share(config.evaluation.held_out_share, config.federation.seed)


def evaluation_examples(config: FederationConfig) -> Examples:
    """The aggregator's held-out set: its own `evaluation.data` (text or instruction records),
    or the corpus's held-out documents."""
    urls = config.evaluation.data
    if not urls:
        return Examples.from_blocks(load_data(config).evaluation)
    examples = _own_examples(config, urls, None, "evaluation")
    return examples.head(config.evaluation.max_blocks)


def partition_clients(config: FederationConfig, data: FederationData) -> dict[str, list[int]]:
    spec = config.partition
    labels = data.train.labels(spec.by)
    parts: Assignment = partition(labels, len(config.clouds), spec.kind, spec.alpha, config.federation.seed)
    return {cloud.name: part for cloud, part in zip(config.clouds, parts, strict=True)}


def initial_adapter(config: FederationConfig) -> Tensors:
    """The round-0 global: LoRA's seeded initialisation on the configured placement, as this
    process's pooled model drew it. A client on the same placement draws the same tensors, so
    with `compression.broadcast` it builds round 0's adapter instead of downloading it (a bf16
    model rounds its adapter's initial values to bf16 before PEFT casts them back to fp32, so the
    placement matters; a client whose draw does not hash to round 0's digest reads it)."""
    return POOL.initial_adapter(model_key(config))


def load_global_model(config: FederationConfig, adapter: Tensors | None, rank: int | None = None):
    """Base model with LoRA attached (of `rank`, the global rank unless given) and, if given,
    the adapter's weights loaded."""
    settings = config.lora if rank is None else config.lora.model_copy(update={"r": rank})
    model = attach_lora(load_base_model(config.model.source), settings, config.federation.seed)
    if adapter is not None:
        load_adapter_state(model, adapter)
    return model


def evaluate_adapter(config: FederationConfig, adapter: Tensors | None, examples: Examples) -> float:
    """Held-out loss on this process's pooled model, on the configured device and dtype;
    `adapter=None` scores the base model alone (round 0)."""
    with POOL.lora_model(model_key(config), adapter) as model:
        if adapter is None:
            with model.disable_adapter():
                return evaluate_loss(model, examples, config.evaluation.batch_size)
        return evaluate_loss(model, examples, config.evaluation.batch_size)


def model_key(config: FederationConfig, rank: int | None = None) -> ModelKey:
    return ModelKey.of(config.model.source, config.training, config.lora, config.federation.seed, rank)


def round_global(
    config: FederationConfig, round_number: int, previous: Tensors, target: Tensors, state: Tensors, residual: Tensors
) -> NextGlobal:
    """The global the aggregator commits for a round: the strategy's `target`, or, with
    `compression.broadcast`, the previous global plus the change as clients decode it."""
    chain = config.compression.broadcast_chain
    names = list(trained_part(config.lora, target))
    return next_global(chain, config.federation.seed, round_number, previous, target, names, state, residual)


def global_for_client(
    config: FederationConfig, ring: KeyRing, store: CheckpointStore, target: ManifestHead, client: str, options: storage.Options | None
) -> Received:
    """The global adapter `client` trains from: read in full, or with `compression.broadcast`
    rebuilt from the one it holds in its own bucket (the seeded initial one at first) and the
    broadcasts since, then held for next time."""
    chain = config.compression.broadcast_chain
    if not chain.names:
        adapter, size = store.adapter_of(target)
        return Received(adapter, b"", size)
    held = held_global(config, ring, client, options)
    received = receive_global(
        store,
        target,
        chain,
        lambda adapter: list(trained_part(config.lora, adapter)),
        held.load(),
        lambda: POOL.initial_adapter(model_key(config)),
        2 * target.adapter_bytes + 2**20,
    )
    held.save(received.committed)
    return received


def round_codes(config: FederationConfig, parties: int, largest_share: float, steps: int) -> Codes | None:
    """How a secure round codes its updates, with `secure_aggregation.bits`: the scale the
    aggregator announces before training, from what it knows (`fedlib.secagg.quantised`)."""
    bits = config.secure_aggregation.bits
    if bits is None:
        return None
    per_step = 1 if config.aggregation.normalize_steps else steps  # FedNova's clients send Δ/τ
    return Codes(bits, parties, code_scale(config.training.learning_rate, per_step, largest_share, bits))


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


def shard_place(config: FederationConfig, client: str) -> ShardPlace:
    """Where `client`'s shard of the simulated split lives, and what it is sealed under."""
    digest = partition_digest(config)
    return ShardPlace(
        url=config.layout.shard_url(client, digest),
        context=EnvelopeContext(config.federation.id, 0, client, f"data/{digest}"),
        cache=config.data_path / "cache" / f"shard-{client}-{digest[:16]}.safetensors",
        seq_len=config.data.seq_len,
    )


def own_data(config: FederationConfig, client: str, options: storage.Options | None) -> ClientData:
    """The client's own files (`clouds[].data`, `clouds[].validation`: text or instruction
    records), read with its credentials and tokenised here; cached in its own data_dir."""
    cloud = config.cloud(client)
    readable = dict(options) if options is not None else None
    train = _own_examples(config, cloud.data, readable, f"{client}/train")
    return ClientData(train, _own_examples(config, cloud.validation, readable, f"{client}/validation"), ", ".join(cloud.data))


def _own_examples(config: FederationConfig, urls: tuple[str, ...], options: dict | None, label: str) -> Examples:
    return own_examples(urls, options, label, config.model.source, config.data.seq_len, config.data_path / "cache")


def client_data(config: FederationConfig, client: str, key: UpdateKey, options: storage.Options | None) -> ClientData:
    """A client's training data: its shard of the simulated split, or its own files."""
    return read_shard(shard_place(config, client), key, options) if config.simulated else own_data(config, client, options)


def expected_of(config: FederationConfig, shard_sizes: Mapping[str, int], budgets: Mapping[str, int]) -> dict[str, Expected]:
    """Each sampled client's limits: its shard (when the aggregator knows it) under the configured
    cap, and its step budget for the round."""
    cap = config.aggregation.max_examples
    return {
        client: Expected(min(cap, shard_sizes.get(client, cap)), budgets.get(client, config.training.local_steps), client in shard_sizes)
        for client in budgets
    }


def round_intake(
    config: FederationConfig,
    round_number: int,
    clients: Sequence[str],
    keys: Mapping[str, UpdateKey],
    global_adapter: Tensors,
    *,
    failed: Mapping[str, str] | None = None,
    late: Sequence[str] = (),
    expected: Mapping[str, Expected] | None = None,
    parent: str = "",
    session: str = "",
    options: Mapping[str, storage.Options] | None = None,
) -> RoundIntake:
    """What the aggregator reads this round and holds each object to; `expected` defaults to
    the configured caps and local steps."""
    limits = expected or expected_of(config, {}, {c: config.training.local_steps for c in clients})
    limit = update_limit(config.aggregation.max_update_bytes, global_adapter)
    return RoundIntake(
        round_number, list(clients), limits, keys, config.layout, limit, dict(failed or {}), list(late), parent, session, options
    )


def aggregate(
    config: FederationConfig, intake: RoundIntake, global_adapter: Tensors, strategy: Strategy | None = None
) -> tuple[Tensors, AggregationReport]:
    """A plain round's updates combined as the config says (`build_strategy`'s strategy unless
    given; pass one to carry its state to the next round)."""
    a = config.aggregation
    strategy = strategy or build_strategy(a, config.privacy, intake.round)
    template = trained_part(config.lora, global_adapter)
    return aggregate_updates(intake, global_adapter, template, strategy, config.compression.chain, a.max_weight_share, a.min_clients)


def weight_rule(config: FederationConfig) -> WeightRule:
    """How much each update counts under secure aggregation."""
    return WeightRule(dp=config.privacy.enabled, normalize_steps=config.aggregation.normalize_steps)


def mask_settings(config: FederationConfig) -> MaskSettings:
    """What masking reads of the config (`fedlib.secagg.client.MaskSettings`)."""
    s = config.secure_aggregation
    return MaskSettings(weight_rule(config), config.privacy, s.frac_bits, s.bits, config.secagg_min_survivors)


def chain_settings(config: FederationConfig) -> ChainSettings:
    """What a client's update chain reads of the config (`fedlib.update.chain.ChainSettings`)."""
    clip = config.privacy.clip_norm if config.privacy.enabled else None
    mask = mask_settings(config) if config.secure_aggregation.enabled else None
    return ChainSettings(config.compression.chain, config.lossy_updates, clip, mask)


def training_plan(config: FederationConfig, client: str, round_number: int, steps: int) -> TrainingPlan:
    """The part of the config one client's local run uses, with its seed for this round and
    its cloud's pacing and process count."""
    t = config.training
    slowdown, min_step_s = emulated_pacing(t, config.profiles, client)
    return TrainingPlan(
        steps=steps,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        seed=client_seed(config.federation.seed, client, round_number) % 2**32,
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


def local_round(
    config: FederationConfig,
    client: str,
    round_number: int,
    steps: int | None = None,
    parent: str = "",
    downloaded: int = 0,
    data_salt: bytes = b"",
) -> LocalRound:
    """Everything one client's round reads of the config, as the value the core takes
    (`fedlib.round.client.LocalRound`); `steps` is the aggregator's step budget, the config's
    `training.local_steps` without one."""
    rank = config.cloud(client).lora_rank or config.lora.r
    return LocalRound(
        client=client,
        round=round_number,
        federation=config.federation.id,
        update_url=update_url(config, client, round_number),
        model=model_key(config, rank),
        global_rank=config.lora.r,
        plan=training_plan(config, client, round_number, steps or config.training.local_steps),
        eval_batch=config.evaluation.batch_size,
        chain=chain_settings(config),
        rounding_seed=client_seed(config.federation.seed, client, round_number) ^ 0x5EED,
        parent=parent,
        downloaded=downloaded,
        data_salt=data_salt,
    )
