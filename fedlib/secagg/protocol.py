"""The messages of one secure-aggregation round, relayed by the aggregator.

1. setup: every client draws a fresh X25519 mask key for the round and sends each peer, sealed
   with their pairwise key, its mask public key and that peer's Shamir share of its mask private
   key. The aggregator relays the messages but can open none of them.
2. masking: each client derives a pairwise seed with every peer's mask public key (taken from
   the authenticated setup messages it received) and masks its encoded update.
3. reveal: for a client that dropped after masking, each survivor opens its share of that
   client's mask key and seals it for the aggregator; `threshold` of them rebuild the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedlib.envelope import EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.keys import KeyRing, fingerprint
from fedlib.rejection import Reason, UpdateRejected
from fedlib.secagg.shamir import Share, combine_shares, split_secret


@dataclass(frozen=True)
class MaskSetup:
    mask_private: X25519PrivateKey  # stays with the client for the round
    messages: dict[str, bytes]  # recipient -> sealed (mask public key, recipient's share)


def _raw(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _pair_key(ring: KeyRing, me: str, peer: str, sender: str) -> UpdateKey:
    return UpdateKey(ring.peer_shared_secret(me, peer), fingerprint(ring.public_key(sender)))


def _setup_context(federation: str, round_number: int, sender: str, recipient: str) -> EnvelopeContext:
    return EnvelopeContext(f"{federation}/secagg-setup", round_number, f"{sender}>{recipient}")


def _reveal_context(federation: str, round_number: int, survivor: str, dropped: str) -> EnvelopeContext:
    return EnvelopeContext(f"{federation}/secagg-reveal", round_number, f"{survivor}>{dropped}")


def make_setup(ring: KeyRing, me: str, clients: Iterable[str], threshold: int, federation: str, round_number: int) -> MaskSetup:
    """Share indices follow the sorted client list (x = position + 1), so every party agrees on them."""
    everyone = sorted(clients)
    mask_private = X25519PrivateKey.generate()
    shares = dict(zip(everyone, split_secret(_raw(mask_private), len(everyone), threshold)))
    public = _raw(mask_private.public_key()).hex()
    messages = {}
    for peer in everyone:
        if peer == me:
            continue
        x, y = shares[peer]
        body = json.dumps({"mask_public": public, "x": x, "y": format(y, "x")}).encode()
        messages[peer] = bytes(seal(body, _pair_key(ring, me, peer, me), _setup_context(federation, round_number, me, peer)))
    return MaskSetup(mask_private, messages)


def open_setup(ring: KeyRing, me: str, sender: str, blob: bytes, federation: str, round_number: int) -> tuple[X25519PublicKey, Share]:
    """The sender's mask public key and my share of its mask key; forged or swapped messages fail."""
    body = open_sealed(blob, _pair_key(ring, me, sender, sender), _setup_context(federation, round_number, sender, me))
    try:
        data = json.loads(body)
        return X25519PublicKey.from_public_bytes(bytes.fromhex(data["mask_public"])), (int(data["x"]), int(data["y"], 16))
    except (ValueError, KeyError, TypeError) as err:
        raise UpdateRejected(Reason.MALFORMED, f"setup message from {sender}: {err}", sender) from None


def make_reveal(ring: KeyRing, survivor: str, dropped: str, share: Share, federation: str, round_number: int, aggregator_key: UpdateKey) -> bytes:
    """A survivor hands the aggregator its share of a dropped client's mask key (and nothing of
    a live client's: revealing both a mask key and that client's masked input would unmask it)."""
    body = json.dumps({"x": share[0], "y": format(share[1], "x")}).encode()
    return bytes(seal(body, aggregator_key, _reveal_context(federation, round_number, survivor, dropped)))


def rebuild_mask_key(
    reveals: Mapping[str, bytes], dropped: str, keys: Mapping[str, UpdateKey], threshold: int, federation: str, round_number: int
) -> X25519PrivateKey:
    """The aggregator opens each survivor's reveal and interpolates the dropped client's mask key."""
    shares = []
    for survivor, blob in sorted(reveals.items()):
        body = json.loads(open_sealed(blob, keys[survivor], _reveal_context(federation, round_number, survivor, dropped)))
        shares.append((int(body["x"]), int(body["y"], 16)))
    if len(shares) < threshold:
        raise ValueError(f"{dropped}: {len(shares)} reveals, threshold is {threshold}")
    return X25519PrivateKey.from_private_bytes(combine_shares(shares[:threshold]))
