"""The aggregator's one intake: every client's object of a round, read, authenticated and held
to what the round asked, one at a time, whether the round is plain or secure.

A `RoundIntake` is everything the intake needs to know of the round (who, what each may claim,
which parent and session an update must name, the keys, where objects live and how large one
may be); the opener is the only part that differs between a plain update
(`fedlib.update.chain.open_client_update`) and a masked one
(`fedlib.round.secure_aggregator.open_masked_update`). Every failure is a named rejection in the
`AggregationReport`, and the round goes on without that client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from fedlib.progress import ClientRejected, emit
from fedlib.rejection import QuorumNotMet, Reason, Rejection, UpdateRejected
from fedlib.update.chain import Expected
from fedlib.update.report import ClientReport, SaidByClient
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey
from fedlib.wire.layout import Layout
from fedlib.wire.storage import Options

T = TypeVar("T")


@dataclass(frozen=True)
class RoundIntake:
    """What the aggregator reads in one round and what it holds each object to. `expected`:
    each sampled client's limits; `failed`: clients whose run failed (why); `late`: those past
    the round deadline, whose objects may land later and are never read; `parent`: the digest of
    the global adapter every update must have been trained from; `session`: the secure session
    every masked update must belong to ("" for a plain round)."""

    round: int
    clients: Sequence[str]
    expected: Mapping[str, Expected]
    keys: Mapping[str, UpdateKey]
    layout: Layout
    max_bytes: int
    failed: Mapping[str, str] = field(default_factory=dict)
    late: Sequence[str] = ()
    parent: str = ""
    session: str = ""
    options: Mapping[str, Options] | None = None


@dataclass
class AggregationReport:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, Rejection] = field(default_factory=dict)
    reports: dict[str, ClientReport] = field(default_factory=dict)  # accepted clients, from their sealed updates
    download_decrypt_s: float = 0.0
    aggregate_s: float = 0.0

    @property
    def stragglers(self) -> list[str]:
        """The clients left out for missing the round's deadline."""
        return sorted(c for c, r in self.rejected.items() if r.reason == Reason.STRAGGLER.value)

    def reject(self, client: str, reason: Reason, detail: str) -> None:
        self.rejected[client] = Rejection(reason.value, detail)
        emit(ClientRejected(client, reason.value, detail))


Opener = Callable[[bytes, UpdateKey, EnvelopeContext], tuple[T, dict[str, str]]]


def read_updates(intake: RoundIntake, report: AggregationReport, opener: Opener[T]) -> Iterator[T]:
    """Download and open each expected client's object, one at a time; what fails to open is
    recorded in `report` with its reason and skipped, as are the clients that failed and those
    late. The client's report comes out of its update's authenticated metadata into
    `report.reports`."""
    for client, why in intake.failed.items():
        report.reject(client, Reason.CLIENT_FAILED, why)
    for client in intake.late:
        report.reject(client, Reason.STRAGGLER, "not done by orchestration.round_deadline_s")
    for client in intake.clients:
        if client in intake.failed or client in intake.late:
            continue
        started = time.perf_counter()
        try:
            url = intake.layout.update_url(client, intake.round)
            blob = storage.read_limited(url, intake.max_bytes, (intake.options or {}).get(client))
            ctx = EnvelopeContext(intake.layout.federation, intake.round, client, intake.session, intake.parent)
            opened, meta = opener(blob, intake.keys[client], ctx)
            examples, steps = intake.expected[client].counts(meta)
            said = SaidByClient.from_json(meta.get("report"))
            report.reports[client] = said.report(client, intake.round, examples, steps, url, len(blob))
            del blob  # one client's bytes in memory at a time
        except UpdateRejected as err:
            report.reject(client, err.reason, err.detail)
            continue
        finally:
            report.download_decrypt_s += time.perf_counter() - started
        report.accepted.append(client)
        yield opened


def check_quorum(intake: RoundIntake, report: AggregationReport, needed: int, rule: str) -> None:
    """`rule` names the setting that asks for `needed` updates."""
    if len(report.accepted) < needed:
        reasons = ", ".join(f"{c}: {r.reason}" for c, r in report.rejected.items()) or "none"
        raise QuorumNotMet(
            f"round {intake.round}: {len(report.accepted)} of {len(intake.clients)} updates accepted, {rule} (rejected: {reasons})"
        )
