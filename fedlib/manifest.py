"""The round manifest: what a committed round was, in one typed schema.

Every party reads it (the aggregator to resume and to plan the next round, the clients to find
their parent adapter, MLflow, the registry and the Prefect artifacts to report), so it is one
dataclass here, built by one function per kind of round (`base_manifest`, `round_manifest`),
written and read as JSON through pydantic's validation (`to_json`, `manifest_from_json`), and
signed by the checkpoint store, which alone fills in the digests and the lineage fields.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fedlib.config import FederationConfig
from fedlib.decode import expect, malformed, parse_json
from fedlib.heterogeneity import round_cost
from fedlib.privacy.accountant import PrivacySpent


@dataclass(frozen=True)
class ClientReport:
    """What one client reports of its round (the aggregator records the accepted ones)."""

    client: str
    round: int
    num_examples: int
    train_loss: float | None  # None under secure aggregation: the aggregator learns no client's loss
    bytes_uploaded: int
    object_url: str
    train_s: float
    encrypt_upload_s: float
    update_norm: float | None  # L2 norm of the delta before any clipping (what DP's clip_norm is tuned against); None under secure aggregation
    local_steps: int = 0
    bytes_downloaded: int = 0  # what it read of the aggregator's store: the manifest, and the adapter or the broadcasts since the one it held
    validation_loss: float | None = None  # the client's score of the adapter it received, on its own split
    validation_tokens: int = 0
    tokens_per_s: float = 0.0  # system metrics of the client's training, as it measured them
    peak_memory_mib: float = 0.0  # its process's peak resident set
    gpu_memory_mib: float = 0.0  # peak GPU memory torch allocated (0 on a CPU)
    cpu_util: float = 0.0  # process CPU seconds per wall second while training (2.0 = two cores busy)
    data_digest: str = ""  # of the examples it trained on, keyed by a secret of the client's: which data, never the data, nor a way to confirm a guess


_SAID_FLOATS = ("train_s", "encode_s")
_SAID_PRIVATE = ("train_loss", "update_norm")  # facts of the client's data: absent under secure aggregation
_SYSTEM = ("tokens_per_s", "peak_memory_mib", "gpu_memory_mib", "cpu_util")


def _digest(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{16}|", value):
        raise malformed("client report", "data_digest is not 16 hex digits")
    return value


@dataclass(frozen=True)
class SaidByClient:
    """The part of a client's report only the client knows, sealed inside its update (the
    aggregator adds what it sees: the counts it checked, the object and its size). `encode_s`
    is the time from trained to sealed; the upload itself is timed by nobody the aggregator can
    trust, so it is not reported."""

    train_loss: float | None
    train_s: float
    encode_s: float
    update_norm: float | None
    bytes_downloaded: int = 0
    validation_loss: float | None = None
    validation_tokens: int = 0
    tokens_per_s: float = 0.0
    peak_memory_mib: float = 0.0
    gpu_memory_mib: float = 0.0
    cpu_util: float = 0.0
    data_digest: str = ""

    def to_json(self) -> str:
        """Compact: it rides in every update, and a compressed LoRA update is a few kB."""
        coarse = {"tokens_per_s": 1, "peak_memory_mib": 0, "gpu_memory_mib": 0, "cpu_util": 2}  # system metrics: what a chart shows
        fields_ = {k: round(v, coarse.get(k, 6)) if isinstance(v, float) else v for k, v in asdict(self).items()}
        fields_ |= {k: int(fields_[k]) for k, digits in coarse.items() if digits == 0}
        return json.dumps(fields_, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | None) -> SaidByClient:
        """The decode boundary for a report: every field a finite, bounded number."""
        data = expect(parse_json(text or "", "client report", 4096, max_depth=1), dict, "client report")
        if set(data) != {f.name for f in fields(cls)}:
            raise malformed("client report", f"fields {sorted(data)[:10]}")

        def number(name: str, integer: bool = False, optional: bool = False):
            value = data[name]
            if value is None and optional:
                return None
            kinds = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not (0 <= value < 1e15):
                raise malformed("client report", f"{name} is not a number in [0, 1e15)")
            return value if integer else float(value)

        return cls(
            train_s=number("train_s"),
            encode_s=number("encode_s"),
            **{name: number(name, optional=True) for name in _SAID_PRIVATE},
            bytes_downloaded=number("bytes_downloaded", integer=True),
            validation_loss=number("validation_loss", optional=True),
            validation_tokens=number("validation_tokens", integer=True),
            **{name: number(name) for name in _SYSTEM},
            data_digest=_digest(data["data_digest"]),
        )

    def for_secure_aggregation(self) -> SaidByClient:
        """What the aggregator may learn of a client under secure aggregation: how it ran (time,
        bytes, memory), never a figure of its data (losses, the update's norm before clipping),
        which is what masking exists to hide."""
        return replace(self, train_loss=None, update_norm=None, validation_loss=None, validation_tokens=0)

    def report(self, client: str, round_number: int, examples: int, steps: int, url: str, size: int) -> ClientReport:
        return ClientReport(
            client=client,
            round=round_number,
            num_examples=examples,
            train_loss=self.train_loss,
            bytes_uploaded=size,
            object_url=url,
            train_s=self.train_s,
            encrypt_upload_s=self.encode_s,
            update_norm=self.update_norm,
            local_steps=steps,
            bytes_downloaded=self.bytes_downloaded,
            validation_loss=self.validation_loss,
            validation_tokens=self.validation_tokens,
            **{name: getattr(self, name) for name in _SYSTEM},
            data_digest=self.data_digest,
        )


@dataclass(frozen=True)
class Rejection:
    """Why a sampled client's update is not in the round (a `fedlib.rejection.Reason` value)."""

    reason: str
    detail: str


@dataclass(frozen=True)
class MessageBytes:
    """Secure aggregation's protocol messages, per client per round, as the aggregator read and
    relayed them: up, the sealed setup and reveal the client posted to its bucket; down, the
    requests relayed to it through the orchestrator (the peers' setups, the survivors)."""

    up: int
    down: int


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
    eval_loss: float
    perplexity: float
    # Filled in by the checkpoint store at commit: the lineage and what the manifest vouches for.
    parent_adapter_sha256: str = ""
    adapter_sha256: str = ""
    adapter_bytes: int = 0
    strategy_state_sha256: str | None = None
    strategy_state_bytes: int | None = None
    broadcast_sha256: str = ""  # the compressed change from the parent adapter (`fedlib.broadcast`), if sent
    broadcast_bytes: int = 0
    # Rounds after 0.
    prefect_flow_run_id: str | None = None
    strategy: str = "fedavg"
    aggregation: dict[str, Any] = field(default_factory=dict)  # the aggregation section as run
    codecs: list[str] = field(default_factory=list)
    sampled: list[str] = field(default_factory=list)
    step_budgets: dict[str, int] = field(default_factory=dict)
    stragglers: list[str] = field(default_factory=list)
    clients: dict[str, ClientReport] = field(default_factory=dict)  # accepted clients' reports
    cost: dict[str, float] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, Rejection] = field(default_factory=dict)
    privacy: PrivacySpent | None = None
    secure_aggregation: dict[str, Any] | None = None
    protocol_bytes: dict[str, MessageBytes] = field(default_factory=dict)  # secure aggregation's messages, per client
    timings: dict[str, float] = field(default_factory=dict)
    base_model: str = ""  # the base weights' revision (`fedlib.model.base_revision`), the same for the whole lineage

    def head(self) -> ManifestHead:
        return ManifestHead(
            self.federation, self.round, self.parent_adapter_sha256, self.adapter_sha256, self.adapter_bytes,
            self.broadcast_sha256, self.broadcast_bytes, self.base_model, tuple(self.accepted),
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


_SCHEMA = TypeAdapter(Manifest)
_HEAD_SCHEMA = TypeAdapter(ManifestHead)


def to_json(manifest: Manifest) -> dict[str, Any]:
    return _SCHEMA.dump_python(manifest, mode="json")


def manifest_from_json(data: Any) -> Manifest:
    """The manifest a JSON value describes; `ValueError` naming the first wrong field if it
    describes none (the caller has verified who signed it, not that it is well formed)."""
    return _validated(_SCHEMA, data, "manifest")


def head_to_json(head: ManifestHead) -> dict[str, Any]:
    return _HEAD_SCHEMA.dump_python(head, mode="json")


def head_from_json(data: Any) -> ManifestHead:
    return _validated(_HEAD_SCHEMA, data, "manifest head")


def _validated(schema: TypeAdapter, data: Any, what: str) -> Any:
    try:
        return schema.validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"not a {what}: {where}: {first['msg']}") from None


def base_manifest(
    federation: str, target_round: int, mlflow_run_id: str, eval_loss: float, timings: Mapping[str, float], base_model: str = ""
) -> Manifest:
    """Round 0: the base model's score, before any client trained; `base_model` is its revision."""
    return Manifest(
        federation, 0, target_round, mlflow_run_id, eval_loss, math.exp(eval_loss), timings=dict(timings), base_model=base_model
    )


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


def round_manifest(
    config: FederationConfig,
    round_number: int,
    previous: Manifest,
    sampled: Sequence[str],
    step_budgets: Mapping[str, int],
    reports: Mapping[str, ClientReport],
    accepted: Sequence[str],
    rejected: Mapping[str, Rejection],
    eval_loss: float,
    timings: Mapping[str, float],
    run_ids: tuple[str, str | None],
    target_round: int,
    privacy: PrivacySpent | None = None,
    secure: Mapping[str, Any] | None = None,
    protocol_bytes: Mapping[str, MessageBytes] | None = None,
    round_trip_s: Mapping[str, float] | None = None,
) -> Manifest:
    """A trained round. `reports` are every client's that reported (accepted or not: a
    rejected client's compute still cost money), held to what the aggregator measured
    (`round_trip_s`: its clock from dispatch to each client's step done); `run_ids` are the
    MLflow run and the Prefect flow run."""
    stragglers = sorted(c for c, r in rejected.items() if r.reason == "straggler")
    reports = {c: held_to_measurements(r, previous, (round_trip_s or {}).get(c)) for c, r in reports.items()}
    mlflow_run_id, flow_run_id = run_ids
    return Manifest(
        federation=config.federation.id,
        round=round_number,
        target_round=target_round,
        mlflow_run_id=mlflow_run_id,
        eval_loss=eval_loss,
        perplexity=math.exp(eval_loss),
        parent_adapter_sha256=previous.adapter_sha256,
        base_model=previous.base_model,
        prefect_flow_run_id=flow_run_id,
        strategy=config.aggregation.strategy,
        aggregation=config.aggregation.model_dump(mode="json"),
        codecs=list(config.compression.codecs),
        sampled=list(sampled),
        step_budgets=dict(step_budgets),
        stragglers=stragglers,
        clients={c: r for c, r in reports.items() if c in accepted},
        cost=round_cost(config, reports, stragglers),
        accepted=list(accepted),
        rejected=dict(rejected),
        privacy=privacy,
        secure_aggregation=dict(secure) if secure else None,
        protocol_bytes=dict(protocol_bytes or {}),
        timings=dict(timings),
    )
