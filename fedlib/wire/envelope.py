"""Authenticated encryption of one client's update for one round.

Layout: MAGIC | u32 header length | header JSON | ciphertext+tag. The header (federation,
round, client, session, parent, key id, nonce, plaintext length) is the AES-GCM associated
data, and the key itself is derived from all of the context by HKDF from the client–aggregator
X25519 shared secret, so an object moved to another round's or client's slot, left over from
another secure-aggregation session, trained from another global adapter, sealed for another
key, or edited anywhere, fails to open. Checks run cheapest first and each failure raises
`UpdateRejected` with its own reason; the header is parsed by the decode boundary.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.decode import expect, parse_json

MAGIC = b"FLENV\x00\x02\x00"
ALGORITHM = "AES-256-GCM"
_LEN = struct.Struct(">I")
_TAG = 16
_MAX_HEADER = 4096


@dataclass(frozen=True)
class UpdateKey:
    """The X25519 shared secret of one client and the aggregator, and the client key's id."""

    secret: bytes
    kid: str


@dataclass(frozen=True)
class EnvelopeContext:
    """Who may have written an object: the aggregator checks every field against the header."""

    federation: str
    round: int
    client: str
    session: str = ""  # the secure-aggregation session a masked update belongs to
    parent: str = ""  # sha256 of the global adapter the update was trained from


def derive_key(secret: bytes, ctx: EnvelopeContext) -> bytes:
    """A fresh AES-256 key per context: one update's key opens nothing else."""
    if len(secret) != 32:
        raise ValueError("the shared secret must be 32 bytes")
    info = json.dumps(["fedlib/update/v2", ctx.federation, ctx.round, ctx.client, ctx.session, ctx.parent]).encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def seal(plaintext: bytes, key: UpdateKey, ctx: EnvelopeContext) -> bytearray:
    nonce = os.urandom(12)
    header = json.dumps(
        {
            "alg": ALGORITHM,
            "federation": ctx.federation,
            "round": ctx.round,
            "client": ctx.client,
            "session": ctx.session,
            "parent": ctx.parent,
            "kid": key.kid,
            "nonce": nonce.hex(),
            "length": len(plaintext),
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    prefix = MAGIC + _LEN.pack(len(header)) + header
    # Encrypt straight into the output: concatenating prefix and ciphertext would copy the update again.
    out = bytearray(len(prefix) + len(plaintext) + _TAG)
    out[: len(prefix)] = prefix
    AESGCM(derive_key(key.secret, ctx)).encrypt_into(nonce, plaintext, prefix, memoryview(out)[len(prefix) :])
    return out


def open_sealed(blob: bytes, key: UpdateKey, expected: EnvelopeContext) -> bytes:
    """Return the plaintext, or raise `UpdateRejected` naming what is wrong."""
    fixed = len(MAGIC) + _LEN.size
    if len(blob) < fixed:
        raise UpdateRejected(Reason.TRUNCATED, f"{len(blob)} bytes is shorter than an envelope's prefix")
    if blob[: len(MAGIC)] != MAGIC:
        raise UpdateRejected(Reason.MALFORMED, "not a fedlib envelope (bad magic)")
    (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
    if header_len > _MAX_HEADER:
        raise UpdateRejected(Reason.MALFORMED, f"header length {header_len} exceeds {_MAX_HEADER}")
    if len(blob) < fixed + header_len:
        raise UpdateRejected(Reason.TRUNCATED, "the envelope ends inside its header")
    prefix = blob[: fixed + header_len]
    header = _parse_header(prefix[fixed:])
    _check_context(header, expected)
    if header["kid"] != key.kid:
        raise UpdateRejected(Reason.WRONG_KEY, f"sealed for key {header['kid']}, expected {key.kid}")
    body = memoryview(blob)[fixed + header_len :]  # a view, not a copy of the update
    if len(body) != header["length"] + _TAG:
        raise UpdateRejected(Reason.TRUNCATED, f"ciphertext is {len(body)} bytes, header promises {header['length'] + _TAG}")
    try:
        return AESGCM(derive_key(key.secret, expected)).decrypt(bytes.fromhex(header["nonce"]), body, prefix)
    except InvalidTag:
        raise UpdateRejected(Reason.AUTHENTICATION_FAILED, "authentication tag does not verify (tampered bytes)") from None


def check_addressed(blob: bytes, expected: EnvelopeContext) -> None:
    """Whoever relays a sealed message it cannot open can still check that it is an envelope of
    the right length addressed to `expected` (a sender's junk is then named at the relay, before
    any recipient spends a step on it); only the recipient's `open_sealed` authenticates it."""
    fixed = len(MAGIC) + _LEN.size
    if len(blob) < fixed or blob[: len(MAGIC)] != MAGIC:
        raise UpdateRejected(Reason.MALFORMED, "not a fedlib envelope (bad magic)")
    (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
    if header_len > _MAX_HEADER or len(blob) < fixed + header_len:
        raise UpdateRejected(Reason.TRUNCATED, "the envelope ends inside its header")
    header = _parse_header(blob[fixed : fixed + header_len])
    _check_context(header, expected)
    if len(blob) != fixed + header_len + header["length"] + _TAG:
        raise UpdateRejected(Reason.TRUNCATED, "the ciphertext is not the length its header promises")


def peek_header(blob: bytes) -> dict:
    """The header of an envelope, unauthenticated: for choosing how to report a rejection,
    never for trusting anything (`open_sealed` checks it all again)."""
    fixed = len(MAGIC) + _LEN.size
    if len(blob) < fixed or blob[: len(MAGIC)] != MAGIC:
        return {}
    (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
    if header_len > _MAX_HEADER or len(blob) < fixed + header_len:
        return {}
    try:
        return _parse_header(blob[fixed : fixed + header_len])
    except UpdateRejected:
        return {}


_FIELDS = {
    "alg": str,
    "federation": str,
    "round": int,
    "client": str,
    "session": str,
    "parent": str,
    "kid": str,
    "nonce": str,
    "length": int,
}


def _parse_header(raw: bytes) -> dict:
    header = expect(parse_json(raw, "envelope header", _MAX_HEADER, max_depth=1), dict, "envelope header")
    for name, kind in _FIELDS.items():
        expect(header.get(name), kind, f"envelope header field {name!r}")
    try:
        nonce_ok = len(bytes.fromhex(header["nonce"])) == 12
    except ValueError:
        nonce_ok = False
    if header["alg"] != ALGORITHM or not nonce_ok or not 0 <= header["length"] < 1 << 40 or not 0 <= header["round"] < 1 << 40:
        raise UpdateRejected(Reason.MALFORMED, "unreadable envelope header: unsupported algorithm or bad nonce, length or round")
    return header


def _check_context(header: dict, expected: EnvelopeContext) -> None:
    if header["federation"] != expected.federation:
        raise UpdateRejected(Reason.WRONG_FEDERATION, f"written for federation {header['federation']!r}, not {expected.federation!r}")
    if header["round"] != expected.round:
        raise UpdateRejected(Reason.WRONG_ROUND, f"written for round {header['round']}, expected {expected.round}")
    if header["client"] != expected.client:
        raise UpdateRejected(Reason.WRONG_CLIENT, f"written by {header['client']!r}, expected {expected.client!r}")
    if header["session"] != expected.session:
        raise UpdateRejected(Reason.WRONG_SESSION, f"sealed in session {header['session']!r}, this is {expected.session!r}")
    if header["parent"] != expected.parent:
        raise UpdateRejected(Reason.WRONG_PARENT, f"trained from adapter {header['parent'][:12]!r}, expected {expected.parent[:12]!r}")
