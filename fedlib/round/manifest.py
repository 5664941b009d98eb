"""The round manifest: what a committed round was, in one typed schema.

Every party reads it (the aggregator to resume and to plan the next round, the clients to find
their parent adapter, MLflow, the registry and the Prefect artifacts to report), so it is one
dataclass here, built by one function per kind of round (`base_manifest`, `round_manifest`),
written and read as JSON through pydantic's validation (`to_json`, `manifest_from_json`), and
signed by the checkpoint store, which alone fills in the digests and the lineage fields.

The held-out score is not in the manifest: the round commits as soon as it is aggregated, and
the next round's clients start from it while the aggregator scores it. The score is its own
signed record (`RoundScore`, bound to the adapter it scored), joined onto the manifest when the
store reads it (`Manifest.with_score`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from fedlib.privacy.accountant import PrivacySpent
from fedlib.rejection import Rejection
from fedlib.round.outcome import MessageBytes, RoundOutcome
from fedlib.update.report import ClientReport


@dataclass(frozen=True)
class ManifestHead:
    """What a client reads of a committed round, signed like the manifest and written beside it
    (`round-NNNN/head.json`): the lineage, the digests and sizes of what it names, the base
    model's revision, and who was accepted. The manifest carries every client's report as well,
    ~4 kB for three clients, which a client does not need to train and would otherwise download
    every round (as much as 7% of what a 1-bit update costs)."""

    federation: str
    round: int
    parent_adapter_sha256: str
    adapter_sha256: str
    adapter_bytes: int
    broadcast_sha256: str
    broadcast_bytes: int
    base_model: str
    accepted: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    federation: str
    round: int
    target_round: int  # the last round of the run that committed this one (resume finishes it)
    mlflow_run_id: str
    # Filled in by the checkpoint store at commit: the lineage and what the manifest vouches for.
    parent_adapter_sha256: str = ""
    adapter_sha256: str = ""
    adapter_bytes: int = 0
    strategy_state_sha256: str | None = None
    strategy_state_bytes: int | None = None
    broadcast_sha256: str = ""  # the compressed change from the parent adapter (`fedlib.round.broadcast`), if sent
    broadcast_bytes: int = 0
    # Rounds after 0.
    prefect_flow_run_id: str | None = None
    strategy: str = "fedavg"
    aggregation: dict[str, Any] = field(default_factory=dict)  # the aggregation section as run
    codecs: list[str] = field(default_factory=list)
    sampled: list[str] = field(default_factory=list)
    step_budgets: dict[str, int] = field(default_factory=dict)
    # the aggregator's own clock from dispatch to each client's training step done: what the next
    # round's step budgets are planned from (`fedlib.round.planning`), never a client's stated time
    round_trip_s: dict[str, float] = field(default_factory=dict)
    stragglers: list[str] = field(default_factory=list)
    clients: dict[str, ClientReport] = field(default_factory=dict)  # accepted clients' reports
    cost: dict[str, float] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, Rejection] = field(default_factory=dict)
    privacy: PrivacySpent | None = None
    secure_aggregation: dict[str, Any] | None = None
    protocol_bytes: dict[str, MessageBytes] = field(default_factory=dict)  # secure aggregation's messages, per client
    timings: dict[str, float] = field(default_factory=dict)
    base_model: str = ""  # the base weights' revision (`fedlib.model.base.base_revision`), the same for the whole lineage
    # Not signed with the manifest: the held-out loss from the round's score record, joined on read
    # (`with_score`); None until the aggregator has scored the round.
    eval_loss: float | None = None

    @property
    def perplexity(self) -> float | None:
        return None if self.eval_loss is None else math.exp(self.eval_loss)

    def with_score(self, score: RoundScore) -> Manifest:
        """This manifest with its score record's loss (and the scoring's time with its timings);
        the caller has checked that the score is this round's and names this adapter."""
        return replace(self, eval_loss=score.eval_loss, timings={**self.timings, "evaluate_s": score.evaluate_s})

    def head(self) -> ManifestHead:
        return ManifestHead(
            self.federation,
            self.round,
            self.parent_adapter_sha256,
            self.adapter_sha256,
            self.adapter_bytes,
            self.broadcast_sha256,
            self.broadcast_bytes,
            self.base_model,
            tuple(self.accepted),
        )

    @property
    def bytes_uploaded(self) -> int:
        return sum(r.bytes_uploaded for r in self.clients.values())

    @property
    def bytes_crossing_clouds(self) -> int:
        """Updates up, global adapters down, and secure aggregation's messages both ways: every
        byte that left a cloud in this round."""
        messages = sum(m.up + m.down for m in self.protocol_bytes.values())
        return sum(r.bytes_uploaded + r.bytes_downloaded for r in self.clients.values()) + messages

    @property
    def federated_eval_loss(self) -> float | None:
        """The median loss of the global adapter this round *started from* (round − 1's), as the
        accepted clients scored it on their own validation splits; None if none did. Each score
        is a client's word, so the median: one client cannot move it past an honest one's (a
        token-weighted mean let one client claiming many tokens set it)."""
        scored = [r.validation_loss for r in self.clients.values() if r.validation_loss is not None]
        return statistics.median(scored) if scored else None


@dataclass(frozen=True)
class RoundScore:
    """The aggregator's held-out score of one committed round, signed and written beside its
    manifest (`round-NNNN/score.json`). It names the federation, the round and the digest of the
    adapter it scored, so a score copied to another round, another federation or another lineage's
    adapter is refused on read; the champion is chosen from these. `evaluate_s` is how long the
    scoring took."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # no other signed record (a manifest, a head) parses as one

    federation: str
    round: int
    adapter_sha256: str
    eval_loss: float
    evaluate_s: float = 0.0


_SCHEMA = TypeAdapter(Manifest)
_HEAD_SCHEMA = TypeAdapter(ManifestHead)
_SCORE_SCHEMA = TypeAdapter(RoundScore)


def to_json(manifest: Manifest) -> dict[str, Any]:
    """The manifest as signed: without the score, which is its own record."""
    return _SCHEMA.dump_python(manifest, mode="json", exclude={"eval_loss"})


def manifest_from_json(data: Any) -> Manifest:
    """The manifest a JSON value describes; `ValueError` naming the first wrong field if it
    describes none (the caller has verified who signed it, not that it is well formed)."""
    return _validated(_SCHEMA, data, "manifest")


def head_to_json(head: ManifestHead) -> dict[str, Any]:
    return _HEAD_SCHEMA.dump_python(head, mode="json")


def head_from_json(data: Any) -> ManifestHead:
    return _validated(_HEAD_SCHEMA, data, "manifest head")


def score_to_json(score: RoundScore) -> dict[str, Any]:
    return _SCORE_SCHEMA.dump_python(score, mode="json")


def score_from_json(data: Any) -> RoundScore:
    return _validated(_SCORE_SCHEMA, data, "round score")


def _validated(schema: TypeAdapter, data: Any, what: str) -> Any:
    try:
        return schema.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"not a {what}: {where}: {first['msg']}") from None


def base_manifest(federation: str, target_round: int, mlflow_run_id: str, timings: Mapping[str, float], base_model: str = "") -> Manifest:
    """Round 0: the seeded initial adapter, before any client trained; `base_model` is the base
    weights' revision. Its score record is the base model's own score."""
    return Manifest(federation, 0, target_round, mlflow_run_id, timings=dict(timings), base_model=base_model)


def download_bound(previous: Manifest) -> int:
    """The most a client can have read of the aggregator's store to start a round: the head or
    manifest, and the adapter, or broadcasts up to twice its size (`global_for_client`'s limit).
    A client's own count of its downloads is held to it, so it cannot inflate the federation's
    byte count past what the aggregator wrote (and trip `budget.bytes`)."""
    return 2 * previous.adapter_bytes + (1 << 20) + (64 << 10)


def held_to_measurements(report: ClientReport, previous: Manifest, round_trip_s: float | None) -> ClientReport:
    """A client's report with what it says held to what the aggregator measured: its downloads
    to `download_bound`, its training time to the aggregator's own clock from dispatch to done."""
    train_s = report.train_s if round_trip_s is None else min(report.train_s, round_trip_s)
    return replace(report, bytes_downloaded=min(report.bytes_downloaded, download_bound(previous)), train_s=train_s)


@dataclass(frozen=True)
class RoundPlan:
    """What a round was asked to be before any client trained: its federation, number and the
    run's target round, the sampled clients and each one's step budget, and the recipe the
    manifest records (strategy, aggregation settings, codecs)."""

    federation: str
    round: int
    target_round: int
    sampled: list[str]
    step_budgets: dict[str, int]
    strategy: str = "fedavg"
    aggregation: dict[str, Any] = field(default_factory=dict)
    codecs: list[str] = field(default_factory=list)


def measured_reports(outcome: RoundOutcome, previous: Manifest) -> dict[str, ClientReport]:
    """Every client's report that reported (accepted or not: a rejected client's compute still
    cost money), held to what the aggregator measured (`held_to_measurements`)."""
    report = outcome.report
    return {c: held_to_measurements(r, previous, outcome.round_trip_s.get(c)) for c, r in report.reports.items()}


def round_manifest(
    previous: Manifest,
    plan: RoundPlan,
    outcome: RoundOutcome,
    cost: Mapping[str, float],
    timings: Mapping[str, float],
    run_ids: tuple[str, str | None],
    privacy: PrivacySpent | None = None,
) -> Manifest:
    """A trained round, from its plan and outcome: the accepted clients' reports as
    `measured_reports` holds them, and `cost`, each cloud's estimate (`fedlib.round.cost`), as
    given; `run_ids` are the MLflow run and the Prefect flow run."""
    report = outcome.report
    reports = measured_reports(outcome, previous)
    mlflow_run_id, flow_run_id = run_ids
    return Manifest(
        federation=plan.federation,
        round=plan.round,
        target_round=plan.target_round,
        mlflow_run_id=mlflow_run_id,
        parent_adapter_sha256=previous.adapter_sha256,
        base_model=previous.base_model,
        prefect_flow_run_id=flow_run_id,
        strategy=plan.strategy,
        aggregation=dict(plan.aggregation),
        codecs=list(plan.codecs),
        sampled=list(plan.sampled),
        step_budgets=dict(plan.step_budgets),
        round_trip_s={c: s for c, s in outcome.round_trip_s.items() if c in report.accepted},
        stragglers=report.stragglers,
        clients={c: r for c, r in reports.items() if c in report.accepted},
        cost=dict(cost),
        accepted=list(report.accepted),
        rejected=dict(report.rejected),
        privacy=privacy,
        secure_aggregation=outcome.secure.as_manifest() if outcome.secure else None,
        protocol_bytes=dict(outcome.protocol_bytes),
        timings=dict(timings),
    )
