"""What a TEE's evidence is to fedlib, and the one way it is refused.

The server's `Attestor` produces evidence (a JSON object: `tee`, the platform's name, and its
fields, binary ones in base64); the client's `Verifier` decides. Every refusal is an
`AttestationFailed` with a `Refusal` a test or a log can match on, and every field crosses
`field_bytes` (or `decode_cbor`) with its size checked before it is decoded, like any other
byte from the wire.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from typing import Any, Protocol

import cbor2


class Refusal(str, Enum):
    NOT_CONFIGURED = "not_configured"  # require_tee without a verifier: a claim is not evidence
    NO_TEE = "no_tee"  # the server says it runs in no TEE
    WRONG_PLATFORM = "wrong_platform"  # evidence of another platform than the verifier checks
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    UNSUPPORTED = "unsupported"  # well formed, but a variant this verifier does not check (e.g. a VLEK)
    UNTRUSTED_ROOT = "untrusted_root"  # the chain ends at a root other than the pinned vendor root
    CHAIN = "chain"  # a certificate not issued by the one above it, or not allowed to issue
    REVOKED = "revoked"  # a certificate the vendor's revocation list (given to the verifier) names
    EXPIRED = "expired"  # a certificate outside its validity at the time of the check
    SIGNATURE = "signature"  # the evidence's own signature does not verify under the leaf key
    STALE = "stale"  # authentic, but made too long before the check
    MEASUREMENT = "measurement"  # another image: a PCR or the launch measurement differs
    POLICY = "policy"  # debug or migration allowed, a VMPL above the maximum, or another guest policy than required
    TCB = "tcb"  # firmware (TCB or ABI) older than the configured minimum, or TCB values that disagree
    BINDING = "binding"  # not bound to this session (replayed, or made for another)


class AttestationFailed(RuntimeError):
    """The server could not show it runs where the client requires."""

    def __init__(self, reason: Refusal, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"attestation refused ({reason.value}): {detail}")


class Attestor(Protocol):
    """The server's side: evidence that it runs in its TEE, carrying `binding` (32 bytes)."""

    def evidence(self, binding: bytes) -> dict[str, Any]: ...


class Verifier(Protocol):
    """The client's side: raise `AttestationFailed` unless `evidence` proves a TEE of the
    expected measurement and carries `binding`."""

    def verify(self, evidence: Mapping[str, Any], binding: bytes) -> None: ...


class NoTEE:
    """The documented default server: no enclave, no pretending."""

    def evidence(self, binding: bytes) -> dict[str, Any]:
        return {"tee": "none", "binding": binding.hex()}


def field_bytes(evidence: Mapping[str, Any], name: str, max_bytes: int) -> bytes:
    """`evidence[name]`, base64, decoded: its length checked before it is decoded."""
    value = evidence.get(name)
    if not isinstance(value, str):
        raise AttestationFailed(Refusal.MALFORMED, f"evidence field {name!r} is missing or not a base64 string")
    if len(value) > 4 * ((max_bytes + 2) // 3):
        raise AttestationFailed(Refusal.TOO_LARGE, f"evidence field {name!r} is over {max_bytes} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AttestationFailed(Refusal.MALFORMED, f"evidence field {name!r} is not base64") from None


class _NoTags(Mapping[int, Callable[[Any], Any]]):
    """cbor2's semantic decoders, every one replaced by a refusal: attestation documents use no
    tags, and a tag is how CBOR builds shared references (cycles), sets, bignums and dates."""

    def __getitem__(self, tag: int) -> Callable[[Any], Any]:
        return _refuse_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_tag(*_: Any) -> Any:
    raise cbor2.CBORDecodeError("a CBOR tag")


def decode_cbor(data: bytes, what: str) -> Any:
    """CBOR from an untrusted party: no tags, no indefinite lengths, no duplicate keys, at most
    8 levels deep, nothing after the value. The caller has bounded `data`, so no length in it can make the decoder
    allocate more than that; any failure is a named refusal, and what comes back is checked
    field by field by the caller."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream, semantic_decoders=_NoTags(), tag_hook=_refuse_tag, max_depth=8, allow_indefinite=False, allow_duplicate_keys=False
        )
        value = decoder.decode()
    except cbor2.CBORDecodeEOF:
        raise AttestationFailed(Refusal.TRUNCATED, f"{what} ends early") from None
    except (cbor2.CBORError, RecursionError, ValueError, TypeError, OverflowError, MemoryError, LookupError) as err:
        raise AttestationFailed(Refusal.MALFORMED, f"{what} is not valid CBOR ({type(err).__name__})") from None
    if stream.tell() != len(data):
        raise AttestationFailed(Refusal.MALFORMED, f"{what} has bytes after its CBOR value")
    return value


def expect_type(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    """`value` when it is of `kind`, else a named refusal (no field of evidence is a bool, and a
    bool would pass for an int)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        raise AttestationFailed(Refusal.MALFORMED, f"{what} has the wrong type")
    return value
