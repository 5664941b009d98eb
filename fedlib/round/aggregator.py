"""The aggregator's side of a round: download, authenticate, decrypt, check, combine.

Every failure is an `UpdateRejected` with a named reason; the round goes on without that
client while `aggregation.min_clients` still hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from fedlib.config import FederationConfig
from fedlib.model.base import trained_part
from fedlib.privacy.dp import DifferentialPrivacy, noise_generator
from fedlib.progress import ClientRejected, emit
from fedlib.rejection import QuorumNotMet, Reason, Rejection, UpdateRejected
from fedlib.strategies import ClientUpdate, Strategy, make_strategy
from fedlib.strategies.normalized import StepNormalized
from fedlib.strategies.shares import capped_updates
from fedlib.update.chain import Expected, open_client_update
from fedlib.update.report import ClientReport, SaidByClient
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey
from fedlib.wire.serialization import Tensors
from fedlib.wire.storage import Options

T = TypeVar("T")


def expected_of(config: FederationConfig, shard_sizes: Mapping[str, int], budgets: Mapping[str, int]) -> dict[str, Expected]:
    """Each sampled client's limits: its shard (when the aggregator knows it) under the configured
    cap, and its step budget for the round."""
    cap = config.aggregation.max_examples
    return {
        client: Expected(min(cap, shard_sizes.get(client, cap)), budgets.get(client, config.training.local_steps), client in shard_sizes)
        for client in budgets
    }


@dataclass
class AggregationReport:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, Rejection] = field(default_factory=dict)
    reports: dict[str, ClientReport] = field(default_factory=dict)  # accepted clients, from their sealed updates
    download_decrypt_s: float = 0.0
    aggregate_s: float = 0.0

    def reject(self, client: str, reason: Reason, detail: str) -> None:
        self.rejected[client] = Rejection(reason.value, detail)
        emit(ClientRejected(client, reason.value, detail))

    def as_dict(self) -> dict:
        return asdict(self)


def build_strategy(config: FederationConfig, round_number: int, state: Tensors | None = None, secure_sum: bool = False) -> Strategy:
    """The configured strategy with its state from the previous round; step-normalised when
    asked, and wrapped in DP-FedAvg when privacy is on. The noise is drawn from the OS's
    randomness unless `privacy.noise_seed` pins it (tests). Under secure aggregation
    (`secure_sum`) the clients have already normalised, clipped and noised what was summed."""
    strategy: Strategy = make_strategy(config.aggregation.strategy, config.aggregation.options)
    strategy.load_state_dict(state or {})
    if secure_sum:
        return strategy
    if config.aggregation.normalize_steps:
        strategy = StepNormalized(strategy)
    p = config.privacy
    if not p.enabled:
        return strategy
    return DifferentialPrivacy(strategy, p.clip_norm, p.noise_multiplier, noise_generator(p.noise_seed, round_number, "aggregator"))


def read_updates(
    config: FederationConfig,
    round_number: int,
    clients: Sequence[str],
    failed: Mapping[str, str],
    keys: Mapping[str, UpdateKey],
    storage_options: Mapping[str, Options] | None,
    report: AggregationReport,
    opener: Callable[[bytes, UpdateKey, EnvelopeContext], tuple[T, dict[str, str]]],
    expected: Mapping[str, Expected],
    late: Sequence[str] = (),
    parent: str = "",
    session: str = "",
    max_bytes: int = 256 * 2**20,
) -> Iterator[T]:
    """Download and open each expected client's object, one at a time; what fails to open is
    recorded in `report` with its reason and skipped, as are the clients that failed and those
    `late` past the round deadline (whose objects may land later and are never read). Every
    object must have been sealed for this round, trained from `parent` (the global adapter's
    digest) and, under secure aggregation, in this `session`. The client's report comes out of
    its update's authenticated metadata into `report.reports`."""
    for client, why in failed.items():
        report.reject(client, Reason.CLIENT_FAILED, why)
    for client in late:
        report.reject(client, Reason.STRAGGLER, "not done by orchestration.round_deadline_s")
    for client in clients:
        if client in failed or client in late:
            continue
        started = time.perf_counter()
        try:
            url = config.layout.update_url(client, round_number)
            options = (storage_options or {}).get(client)
            blob = storage.read_limited(url, max_bytes, options)
            ctx = EnvelopeContext(config.federation.id, round_number, client, session, parent)
            opened, meta = opener(blob, keys[client], ctx)
            examples, steps = expected[client].counts(meta)
            said = SaidByClient.from_json(meta.get("report"))
            report.reports[client] = said.report(client, round_number, examples, steps, url, len(blob))
            del blob  # one client's bytes in memory at a time
        except UpdateRejected as err:
            report.reject(client, err.reason, err.detail)
            continue
        finally:
            report.download_decrypt_s += time.perf_counter() - started
        report.accepted.append(client)
        yield opened


def update_limit(config: FederationConfig, global_adapter: Tensors) -> int:
    """The most bytes read of one client's update: `aggregation.max_update_bytes`, or twice the
    adapter's fp32 size plus 1 MiB (for the envelope, metadata and codec headers; the largest
    encoding is fp32 itself). A bucket that serves more is refused before the bytes are held."""
    if config.aggregation.max_update_bytes is not None:
        return config.aggregation.max_update_bytes
    return 2 * sum(4 * v.numel() for v in global_adapter.values()) + 2**20


def check_quorum(round_number: int, clients: Sequence[str], report: AggregationReport, needed: int, rule: str) -> None:
    """`rule` names the setting that asks for `needed` updates."""
    if len(report.accepted) < needed:
        reasons = ", ".join(f"{c}: {r.reason}" for c, r in report.rejected.items()) or "none"
        raise QuorumNotMet(f"round {round_number}: {len(report.accepted)} of {len(clients)} updates accepted, {rule} (rejected: {reasons})")


def aggregate_updates(
    config: FederationConfig,
    round_number: int,
    global_adapter: Tensors,
    clients: Sequence[str],
    failed: Mapping[str, str],
    keys: Mapping[str, UpdateKey],
    storage_options: Mapping[str, Options] | None = None,
    strategy: Strategy | None = None,
    late: Sequence[str] = (),
    expected: Mapping[str, Expected] | None = None,
    parent: str = "",
) -> tuple[Tensors, AggregationReport]:
    """Stream each expected client's update through `open_client_update` into the strategy
    (`build_strategy`'s unless given; pass one to carry its state to the next round).
    `expected` holds each client's limits (default: the configured caps and local steps);
    `parent` is the digest of `global_adapter`, which every update must have been trained from.

    Rejected updates are recorded and skipped; the round fails only if fewer than
    `aggregation.min_clients` remain."""
    report = AggregationReport()

    chain, max_bytes = config.compression.chain, update_limit(config, global_adapter)
    limits = expected or expected_of(config, {}, {c: config.training.local_steps for c in clients})

    template = trained_part(config.lora, global_adapter)  # what an update holds, and all it may change

    def opener(blob: bytes, key: UpdateKey, ctx: EnvelopeContext) -> tuple[ClientUpdate, dict[str, str]]:
        return open_client_update(blob, key, ctx, template, limits[ctx.client], chain, max_bytes)

    updates = read_updates(
        config, round_number, clients, failed, keys, storage_options, report, opener, limits, late, parent, max_bytes=max_bytes
    )
    updates = capped_updates(updates, config.aggregation.max_weight_share, {c for c, e in limits.items() if e.count_known})
    started = time.perf_counter()
    strategy = strategy or build_strategy(config, round_number)
    try:
        new_adapter = {**global_adapter, **strategy.aggregate(round_number, template, updates)}
    except ValueError:
        if report.accepted:
            raise
        new_adapter = None  # no update survived; reported as a quorum failure below
    report.aggregate_s = time.perf_counter() - started - report.download_decrypt_s
    min_clients = config.aggregation.min_clients
    check_quorum(round_number, clients, report, min_clients, f"aggregation.min_clients={min_clients}")
    assert new_adapter is not None
    return new_adapter, report
