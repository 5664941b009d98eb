"""What a round cost each cloud, estimated from its profile's prices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlib.config import CloudProfile
from fedlib.update.report import ClientReport


def round_cost(
    profiles: Mapping[str, CloudProfile], deadline: float | None, clients: Mapping[str, ClientReport], stragglers: Sequence[str] = ()
) -> dict[str, float]:
    """Estimated money per cloud for one round: its training time at its hourly price, plus
    its update leaving the cloud at its egress price (the aggregator reads it from there). A
    straggler is charged the round deadline's worth of compute, the least it used."""
    cost = {}
    for client, report in clients.items():
        profile = profiles[client]
        compute = report.train_s / 3600 * profile.price_per_hour
        egress = report.bytes_uploaded / 1e9 * profile.egress_per_gb
        cost[client] = compute + egress
    for client in stragglers:
        cost[client] = (deadline or 0.0) / 3600 * profiles[client].price_per_hour
    return cost
