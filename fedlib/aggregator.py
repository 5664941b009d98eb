"""The aggregator's side of a round: download, authenticate, decrypt, check, combine.

Every failure is an `UpdateRejected` with a named reason; the round goes on without that
client while `aggregation.min_clients` still hold.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from fedlib import storage
from fedlib.config import FederationConfig
from fedlib.envelope import EnvelopeContext, UpdateKey, open_sealed
from fedlib.federation import Tensors, progress, update_url
from fedlib.rejection import QuorumNotMet, Reason, UpdateRejected
from fedlib.serialization import bytes_to_tensors, read_metadata
from fedlib.storage import Options
from fedlib.privacy.dp import DifferentialPrivacy
from fedlib.strategies import ClientUpdate, Strategy, make_strategy
from fedlib.validation import check_update


def open_client_update(
    blob: bytes, key: UpdateKey, ctx: EnvelopeContext, template: Tensors
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


def build_strategy(config: FederationConfig, round_number: int) -> Strategy:
    """The configured strategy, wrapped in DP-FedAvg when privacy is on. The noise is drawn from
    the OS's randomness unless `privacy.noise_seed` pins it (tests)."""
    strategy = make_strategy(config.aggregation.strategy)
    p = config.privacy
    if not p.enabled:
        return strategy
    seed = secrets.randbits(63) if p.noise_seed is None else p.noise_seed * 1_000_003 + round_number
    return DifferentialPrivacy(strategy, p.clip_norm, p.noise_multiplier, torch.Generator().manual_seed(seed))


def aggregate_updates(
    config: FederationConfig,
    round_number: int,
    global_adapter: Tensors,
    clients: Sequence[str],
    failed: dict[str, str],
    keys: Mapping[str, UpdateKey],
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
                update = open_client_update(blob, keys[client], EnvelopeContext(config.federation.id, round_number, client), global_adapter)
            except UpdateRejected as err:
                report.reject(client, err.reason, err.detail)
                continue
            finally:
                report.download_decrypt_s += time.perf_counter() - started
            report.accepted.append(client)
            yield update

    started = time.perf_counter()
    strategy = build_strategy(config, round_number)
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

