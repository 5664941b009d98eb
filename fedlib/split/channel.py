"""The encrypted channel between a client's slices and the server's: activations forward, gradients
back, each message sealed with the update envelope (AES-256-GCM, header as associated data)
under a key for this session, direction and sequence number.

The session secret mixes an ephemeral–ephemeral X25519 exchange with the static client–server
exchange and a nonce the server draws for each hello. The server's ephemeral key is drawn for
the session inside the server's process (inside the TEE, where there is one) and never leaves
it; its public half is in the server's answer and in the attestation binding, so evidence from
the TEE vouches that the key the client exchanges with was made there. The aggregator's static
key only authenticates: whoever holds its key file (the host outside an enclave, the parent
instance that hands it to a diskless enclave, whoever built the image) still cannot compute the
ephemeral exchange, so opens no recorded message and forges none. A recorded session stays
closed even if every long-term key leaks later, and a recorded hello replayed to the server
opens a session under a new key, in which none of the recorded messages open. The hello carries
a proof sealed under the static key (it binds the session id, the ephemeral key and a challenge
the server issued moments before), so nobody without the client's key can open a session at all,
and a hello recorded from one server process opens nothing on another or on the same server
restarted (its challenge was never issued there). A message is accepted only with the next
sequence number in its direction, so a replayed or reordered one is refused by name.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.decode import expect, load_tensors, malformed
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed, peek_header, seal
from fedlib.wire.keys import KeyRing, fingerprint
from fedlib.wire.serialization import Tensors, tensors_to_bytes

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
        tensors, metadata = load_tensors(payload, f"{kind} message")
        if metadata.get("kind") != kind:
            raise UpdateRejected(Reason.MALFORMED, f"expected a {kind} message", self.peer)
        self.received += 1
        return tensors


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _session_key(
    ephemeral_shared: bytes, static_shared: bytes, session: str, server_nonce: str, server_ephemeral: str, client_public: X25519PublicKey
) -> UpdateKey:
    """`ephemeral_shared`: the client's ephemeral key with the server's (never a static key)."""
    info = f"fedlib/split/v3/{session}/{server_nonce}/{server_ephemeral}".encode()
    secret = HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(ephemeral_shared + static_shared)
    return UpdateKey(secret, fingerprint(client_public))


def _hello_context(client: str, session: str, ephemeral: str, challenge: str) -> EnvelopeContext:
    return EnvelopeContext(f"split-hello/{challenge}", 0, client, session, ephemeral)


CHALLENGE_BYTES = 32  # issue time (8), random (8), MAC (16)


@dataclass(frozen=True)
class HelloChallenges:
    """The challenges a server hands out before a hello, checked without keeping any: each is
    its issue time and a random part under a MAC keyed by a secret drawn when this server process
    started. A restarted server, or another replica, draws another secret, so a recorded hello
    names a challenge it never issued; a challenge older than `ttl_s` is refused too."""

    ttl_s: float = 120.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self.secret, b"fedlib/split/challenge/v1" + body, hashlib.sha256).digest()[:16]

    def issue(self, now: float) -> str:
        body = int(now * 1000).to_bytes(8, "big", signed=True) + secrets.token_bytes(8)
        return (body + self._mac(body)).hex()

    def check(self, challenge: Any, now: float) -> None:
        """Refuses, by name, a challenge this server process did not issue or issued too long
        ago. A MAC check, so it runs before any key exchange a hello would cost."""
        if not isinstance(challenge, str) or len(challenge) != 2 * CHALLENGE_BYTES:
            raise malformed("hello challenge", f"expected {CHALLENGE_BYTES} bytes of hex")
        try:
            raw = bytes.fromhex(challenge)
        except ValueError:
            raise malformed("hello challenge", "not hex") from None
        body, mac = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise UpdateRejected(Reason.STALE, "hello challenge was not issued by this server process; ask /challenge again")
        age = now - int.from_bytes(body[:8], "big", signed=True) / 1000
        if not 0 <= age <= self.ttl_s:
            raise UpdateRejected(Reason.STALE, f"hello challenge is {age:.0f} s old, over {self.ttl_s:.0f} s; ask /challenge again")


def attestation_binding(session: str, ephemeral: str, server_nonce: str, server_ephemeral: str, server_public: X25519PublicKey) -> bytes:
    """What a TEE's evidence must carry (SEV-SNP's REPORT_DATA, Nitro's user_data or nonce):
    a 32-byte digest of this session's nonces and the keys of this channel, above all the
    server's ephemeral key, so evidence vouches that the key was made inside the TEE, and
    evidence from another session or server cannot be replayed."""
    transcript = json.dumps(["fedlib/split/attest/v2", session, ephemeral, server_nonce, server_ephemeral, _raw(server_public).hex()])
    return hashlib.sha256(transcript.encode()).digest()


@dataclass(frozen=True)
class PendingHello:
    """The client's half of a handshake, until the server's answer names its nonce."""

    client: str
    session: str
    ephemeral: X25519PrivateKey
    static_shared: bytes
    client_public: X25519PublicKey
    server_public: X25519PublicKey

    def finish(self, server_nonce: str, server_ephemeral: str) -> ChannelSide:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(server_ephemeral))
        ephemeral_shared = self.ephemeral.exchange(peer)
        key = _session_key(ephemeral_shared, self.static_shared, self.session, server_nonce, server_ephemeral, self.client_public)
        return ChannelSide(self.session, self.client, SERVER, key)

    def binding(self, server_nonce: str, server_ephemeral: str) -> bytes:
        return attestation_binding(
            self.session, _raw(self.ephemeral.public_key()).hex(), server_nonce, server_ephemeral, self.server_public
        )


def server_ephemeral_of(answer: dict[str, Any]) -> str:
    """The server's ephemeral public key from its hello answer: 32 bytes of hex."""
    return _hex_field(answer, "server_ephemeral", 32)


def client_hello(ring: KeyRing, client: str, challenge: str) -> tuple[dict[str, str], PendingHello]:
    """What the client sends to open a session (public values and a proof bound to the server's
    `challenge`), and its pending end."""
    ephemeral = X25519PrivateKey.generate()
    session = secrets.token_hex(16)
    static_shared = ring.client_shared_secret(client)
    ephemeral_hex = _raw(ephemeral.public_key()).hex()
    proof = seal(
        b"", UpdateKey(static_shared, fingerprint(ring.public_key(client))), _hello_context(client, session, ephemeral_hex, challenge)
    )
    hello = {"client": client, "session": session, "ephemeral": ephemeral_hex, "challenge": challenge, "proof": bytes(proof).hex()}
    return hello, PendingHello(client, session, ephemeral, static_shared, ring.public_key(client), ring.aggregator_public)


def _hex_field(hello: dict[str, Any], name: str, length: int | None) -> str:
    value = expect(hello.get(name), str, f"hello {name}")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise malformed(f"hello {name}", "not hex") from None
    if length is not None and len(raw) != length:
        raise malformed(f"hello {name}", f"{len(raw)} bytes, expected {length}")
    return value


@dataclass(frozen=True)
class Accepted:
    """The server's end of a new session, with what its answer carries."""

    channel: ChannelSide
    server_nonce: str
    server_ephemeral: str  # the public half of the key drawn for this session, in this process
    binding: bytes  # what the TEE's evidence must carry


def server_accept(ring: KeyRing, hello: Any) -> Accepted:
    """The server's end for a client's hello. Refuses a hello whose proof does not open under
    that client's static key for the challenge it names (whether this server issued that
    challenge is `HelloChallenges.check`'s to say). Needs the server's (aggregator's) private
    key to authenticate; the session's secret comes from an ephemeral key drawn here, whose
    private half is dropped with this call."""
    if ring.aggregator_private is None:
        raise KeyError("this key ring has no server private key")
    expect(hello, dict, "hello")
    client = expect(hello.get("client"), str, "hello client")
    if client not in ring.client_public:
        raise UpdateRejected(Reason.WRONG_CLIENT, f"hello from {client[:40]!r}, not a client of this federation")
    session, ephemeral = _hex_field(hello, "session", 16), _hex_field(hello, "ephemeral", 32)
    challenge = _hex_field(hello, "challenge", CHALLENGE_BYTES)
    proof = bytes.fromhex(_hex_field(hello, "proof", None))
    static_shared = ring.aggregator_shared_secret(client)
    open_sealed(
        proof, UpdateKey(static_shared, fingerprint(ring.public_key(client))), _hello_context(client, session, ephemeral, challenge)
    )
    server_nonce = secrets.token_hex(16)
    mine = X25519PrivateKey.generate()
    server_ephemeral = _raw(mine.public_key()).hex()
    ephemeral_shared = mine.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(ephemeral)))
    key = _session_key(ephemeral_shared, static_shared, session, server_nonce, server_ephemeral, ring.public_key(client))
    binding = attestation_binding(session, ephemeral, server_nonce, server_ephemeral, ring.aggregator_private.public_key())
    return Accepted(ChannelSide(session, SERVER, client, key), server_nonce, server_ephemeral, binding)
