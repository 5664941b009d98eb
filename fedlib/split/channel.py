"""The encrypted channel between a client's slices and the server's: activations forward,
gradients back, each message sealed with the update envelope (AES-256-GCM, header as
associated data) under a key for this session, direction and sequence number.

The session secret mixes an ephemeral X25519 exchange (fresh per session: a recorded session
stays closed even if long-term keys leak later) with the static client–server exchange (only
that client and that server can complete it). A message is accepted only with the next
sequence number in its direction, so a replayed or reordered one is refused by name.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlib.envelope import EnvelopeContext, UpdateKey, open_sealed, peek_header, seal
from fedlib.keys import KeyRing, fingerprint
from fedlib.rejection import Reason, UpdateRejected
from fedlib.serialization import Tensors, bytes_to_tensors, read_metadata, tensors_to_bytes

SERVER = "server"


@dataclass
class ChannelSide:
    """One end: seals what it sends and opens what it receives, each in sequence."""

    session: str
    me: str
    peer: str
    key: UpdateKey
    sent: int = 0
    received: int = 0
    bytes_sent: int = field(default=0)

    def _context(self, sender: str, receiver: str, seq: int) -> EnvelopeContext:
        return EnvelopeContext(f"split/{self.session}", seq, f"{sender}>{receiver}")

    def seal(self, kind: str, tensors: Tensors) -> bytes:
        payload = tensors_to_bytes(tensors, metadata={"kind": kind})
        blob = bytes(seal(payload, self.key, self._context(self.me, self.peer, self.sent)))
        self.sent += 1
        self.bytes_sent += len(blob)
        return blob

    def open(self, kind: str, blob: bytes) -> Tensors:
        """The tensors of the next message, which must be of `kind`; anything else is an
        `UpdateRejected` whose reason says why (replayed, authentication_failed, ...)."""
        header = peek_header(blob)
        if header.get("round", self.received) < self.received:
            raise UpdateRejected(Reason.REPLAYED, f"message {header['round']} again; expecting {self.received}", self.peer)
        payload = open_sealed(blob, self.key, self._context(self.peer, self.me, self.received))
        if read_metadata(payload).get("kind") != kind:
            raise UpdateRejected(Reason.MALFORMED, f"expected a {kind} message", self.peer)
        self.received += 1
        return bytes_to_tensors(payload)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _session_key(ephemeral_shared: bytes, static_shared: bytes, session: str, client_public: X25519PublicKey) -> UpdateKey:
    secret = HKDF(hashes.SHA256(), 32, salt=None, info=f"fedlib/split/v1/{session}".encode()).derive(
        ephemeral_shared + static_shared
    )
    return UpdateKey(secret, fingerprint(client_public))


def client_hello(ring: KeyRing, client: str) -> tuple[dict[str, str], ChannelSide]:
    """What the client sends to open a session (public values only), and its end."""
    ephemeral = X25519PrivateKey.generate()
    session = secrets.token_hex(8)
    key = _session_key(
        ephemeral.exchange(ring.aggregator_public), ring.client_shared_secret(client), session, ring.public_key(client)
    )
    hello = {"client": client, "session": session, "ephemeral": _raw(ephemeral.public_key()).hex()}
    return hello, ChannelSide(session, client, SERVER, key)


def server_accept(ring: KeyRing, hello: dict[str, str]) -> ChannelSide:
    """The server's end for a client's hello; needs the server's (aggregator's) private key."""
    if ring.aggregator_private is None:
        raise KeyError("this key ring has no server private key")
    client = hello["client"]
    ephemeral = X25519PublicKey.from_public_bytes(bytes.fromhex(hello["ephemeral"]))
    key = _session_key(
        ring.aggregator_private.exchange(ephemeral), ring.aggregator_shared_secret(client), hello["session"], ring.public_key(client)
    )
    return ChannelSide(hello["session"], SERVER, client, key)
