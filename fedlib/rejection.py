"""Why an update was refused. Each reason is a name that logs, metrics and tests can match on."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reason(str, Enum):
    MISSING = "missing"
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    WRONG_FEDERATION = "wrong_federation"
    WRONG_ROUND = "wrong_round"
    WRONG_CLIENT = "wrong_client"
    WRONG_KEY = "wrong_key"
    AUTHENTICATION_FAILED = "authentication_failed"
    UNEXPECTED_TENSORS = "unexpected_tensors"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    NON_FINITE = "non_finite"
    CLIENT_FAILED = "client_failed"
    MISCONFIGURED = "misconfigured"  # its own preflight failed: the detail names the config field and the fix
    STRAGGLER = "straggler"  # not done by the round deadline
    REPLAYED = "replayed"  # a split-channel message whose sequence number was already used
    WRONG_SESSION = "wrong_session"  # sealed for another secure-aggregation or split session
    WRONG_PARENT = "wrong_parent"  # trained from, or committed after, another global adapter
    OUT_OF_RANGE = "out_of_range"  # a self-reported count past what the round asked for
    STALE = "stale"  # authentic, but from an earlier round than the one it is offered for
    SESSION_REUSED = "session_reused"  # a split hello for a session id the server has seen
    TOO_MANY_SESSIONS = "too_many_sessions"
    UNKNOWN_SESSION = "unknown_session"  # no live session by that id (never opened, or expired)
    BAD_SETUP = "bad_setup"  # secure-aggregation setup messages its peers cannot open
    ALREADY_REVEALED = "already_revealed"  # a second reveal that would expose a peer's update
    TOO_FEW_SURVIVORS = "too_few_survivors"  # a reveal for fewer survivors than the noise shares were scaled to


class UpdateRejected(Exception):
    """An update the aggregator will not use; the round goes on without it if quorum holds."""

    def __init__(self, reason: Reason, detail: str, client: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.client = client
        who = f"client {client!r}: " if client else ""
        super().__init__(f"{who}update rejected ({reason.value}): {detail}")


class QuorumNotMet(RuntimeError):
    """Too few updates survived for the round to mean anything."""


@dataclass(frozen=True)
class Rejection:
    """Why a sampled client's update is not in the round: a `Reason` value and the detail."""

    reason: str
    detail: str
