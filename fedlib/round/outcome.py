"""What a round's aggregation came to, the same type whether the round was plain or secure:
the intake's report, what the aggregator measured itself, and, for a secure round, the
protocol's facts and message sizes. The manifest is built from it (`round_manifest`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedlib.update.intake import AggregationReport


@dataclass(frozen=True)
class MessageBytes:
    """Secure aggregation's protocol messages, per client per round, as the aggregator read and
    relayed them: up, the sealed setup and reveal the client posted to its bucket; down, the
    requests relayed to it through the orchestrator (the peers' setups, the survivors)."""

    up: int
    down: int


@dataclass(frozen=True)
class SecureFacts:
    """What a secure round records of its protocol: the session, the threshold, who failed the
    setup, who dropped after it, who revealed and whose reveal failed (and why)."""

    session: str
    threshold: int
    setup_failed: list[str]
    dropped_after_setup: list[str]
    revealed_by: list[str]
    reveal_failed: dict[str, str]

    def as_manifest(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PhaseTimings:
    """Seconds of the round's client phases, as the aggregator timed them: from dispatch to the
    last client done, and for a secure round its setup and its reveals and unmasking."""

    clients_wall_s: float
    secagg_setup_s: float | None = None
    secagg_reveal_unmask_s: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {name: value for name, value in asdict(self).items() if value is not None}


@dataclass(frozen=True)
class RoundOutcome:
    """`round_trip_s`: the aggregator's own clock from dispatch to each client's step done,
    which holds what clients say of their training time."""

    report: AggregationReport
    round_trip_s: dict[str, float]
    phases: PhaseTimings
    protocol_bytes: dict[str, MessageBytes] = field(default_factory=dict)
    secure: SecureFacts | None = None
