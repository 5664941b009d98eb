"""The typed messages of a secure-aggregation round, between the aggregator's round flow and each
client's steps. Locally they are passed as they are; through a deployment they travel as JSON
flow parameters and results, and `from_json` is their decode boundary (wrong types, unknown
peers or non-hex blobs are named rejections)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fedlib.wire.decode import expect, malformed

_MAX_BLOB_HEX = 1 << 16


def _hex(value: Any, what: str) -> str:
    expect(value, str, what)
    if len(value) > _MAX_BLOB_HEX or len(value) % 2:
        raise malformed(what, "not a short hex string")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise malformed(what, "not hex") from None
    return value


def _names(value: Any, what: str) -> tuple[str, ...]:
    expect(value, list, what)
    if not all(isinstance(v, str) and len(v) <= 64 for v in value):
        raise malformed(what, "client names must be short strings")
    return tuple(value)


def _inbox(value: Any, what: str) -> dict[str, str]:
    expect(value, dict, what)
    return {_names([k], what)[0]: _hex(v, f"{what}[{k}]") for k, v in value.items()}


def _fields(value: Any, names: set[str], what: str) -> dict[str, Any]:
    expect(value, dict, what)
    if set(value) != names:
        raise malformed(what, f"expected the fields {sorted(names)}, got {sorted(value)[:8]}")
    return value


@dataclass(frozen=True)
class SetupRequest:
    session_id: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> SetupRequest:
        data = _fields(value, {"session_id"}, "setup request")
        return cls(_hex(data["session_id"], "session_id"))


@dataclass(frozen=True)
class SetupMessage:
    """A client's setup: its round mask public key, and for each peer, sealed for that peer
    alone, the public key and the peer's shares of this client's two secrets. `num_examples` is
    the client's example count (its FedAvg weight), which the aggregator needs before training
    to scale the masked sum, since it may know no client's data (held to the round's cap)."""

    mask_public: str
    sealed: dict[str, str]
    num_examples: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> SetupMessage:
        data = _fields(value, {"mask_public", "sealed", "num_examples"}, "setup message")
        public = _hex(data["mask_public"], "mask_public")
        if len(public) != 64:
            raise malformed("mask_public", "not a 32-byte X25519 key")
        examples = data["num_examples"]
        if isinstance(examples, bool) or not isinstance(examples, int) or not 0 <= examples <= 2**53:
            raise malformed("num_examples", "not a count")
        return cls(public, _inbox(data["sealed"], "sealed setups"), examples)


@dataclass(frozen=True)
class TrainRequest:
    """Train and mask: the session, the setups the aggregator relayed to this client, the sum
    of every participant's weight (so the unmasked sum is already the mean), and the scale of
    the codes, when they are low-bit."""

    session_id: str
    inbox: dict[str, str]
    weight_scale: float
    code_scale: float = 0.0  # the value of code 1 under `secure_aggregation.bits`, else 0
    max_examples: int = 0  # the count this client's weight is capped to (`fedlib.strategies.shares`), 0 for none

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Any) -> TrainRequest:
        data = _fields(value, {"session_id", "inbox", "weight_scale", "code_scale", "max_examples"}, "train request")
        scale, code, cap = data["weight_scale"], data["code_scale"], data["max_examples"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e15:
            raise malformed("weight_scale", "not a positive number")
        if isinstance(code, bool) or not isinstance(code, (int, float)) or not 0 <= code < 1e15:
            raise malformed("code_scale", "not a number ≥ 0")
        if type(cap) is not int or not 0 <= cap <= 2**53:
            raise malformed("max_examples", "not a count")
        return cls(_hex(data["session_id"], "session_id"), _inbox(data["inbox"], "inbox"), float(scale), float(code), cap)


@dataclass(frozen=True)
class RevealRequest:
    """Reveal shares: of the survivors' self seeds and of the dropped clients' mask keys."""

    session_id: str
    inbox: dict[str, str]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "survivors": list(self.survivors), "dropped": list(self.dropped)}

    @classmethod
    def from_json(cls, value: Any) -> RevealRequest:
        data = _fields(value, {"session_id", "inbox", "survivors", "dropped"}, "reveal request")
        return cls(
            _hex(data["session_id"], "session_id"),
            _inbox(data["inbox"], "inbox"),
            _names(data["survivors"], "survivors"),
            _names(data["dropped"], "dropped"),
        )


REQUESTS = {"setup": SetupRequest, "train": TrainRequest, "reveal": RevealRequest}


def relayed_bytes(message: SetupRequest | TrainRequest | RevealRequest) -> int:
    """A request's size as the JSON it travels as: what relaying it to a client costs."""
    return len(json.dumps(message.to_json(), separators=(",", ":")).encode())
