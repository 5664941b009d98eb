"""Who can read and who can sign: X25519 key pairs for every party, Ed25519 for the aggregator.

A client's update key is derived from the X25519 shared secret between that client and the
aggregator, so only those two can open it, and a storage provider holding every object and
every public key still cannot. The aggregator signs each round's manifest so that clients can
check that the global adapter they start from is the one the aggregator committed.

Private keys are PEM files with mode 0600, public keys `.pub` PEM files beside them. The
embedded default keeps every party's keys in one folder; in a real deployment each party's
folder holds everyone's `.pub` files and only its own private key, and the key ring loads what
is there.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

AGGREGATOR = "aggregator"


def fingerprint(public_key: X25519PublicKey | Ed25519PublicKey) -> str:
    """A short id for a public key; envelopes carry it so a wrong key is named, not guessed."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class KeyRing:
    """The keys one process holds: every public key, and the private keys it is entitled to."""

    aggregator_public: X25519PublicKey
    signing_public: Ed25519PublicKey
    client_public: dict[str, X25519PublicKey]
    aggregator_private: X25519PrivateKey | None = None
    signing_private: Ed25519PrivateKey | None = None
    client_private: dict[str, X25519PrivateKey] = field(default_factory=dict)

    def client_shared_secret(self, client: str) -> bytes:
        """The client's side of the exchange (needs that client's private key)."""
        try:
            private = self.client_private[client]
        except KeyError:
            raise KeyError(f"no private key for client {client!r} in this key ring") from None
        return private.exchange(self.aggregator_public)

    def aggregator_shared_secret(self, client: str) -> bytes:
        """The aggregator's side of the exchange with `client` (needs the aggregator's key)."""
        if self.aggregator_private is None:
            raise KeyError("this key ring has no aggregator private key")
        return self.aggregator_private.exchange(self.public_key(client))

    def peer_shared_secret(self, me: str, peer: str) -> bytes:
        """A client's secret with another client (for messages only those two can read)."""
        try:
            return self.client_private[me].exchange(self.public_key(peer))
        except KeyError:
            raise KeyError(f"no private key for client {me!r} in this key ring") from None

    def client_derived_secret(self, client: str, purpose: str) -> bytes:
        """A 32-byte secret only `client` can derive (for its own state, never shared)."""
        try:
            private = self.client_private[client]
        except KeyError:
            raise KeyError(f"no private key for client {client!r} in this key ring") from None
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return HKDF(hashes.SHA256(), 32, salt=None, info=f"fedlib/{purpose}/v1".encode()).derive(raw)

    def public_key(self, client: str) -> X25519PublicKey:
        try:
            return self.client_public[client]
        except KeyError:
            raise KeyError(f"no public key for client {client!r}") from None


def _write_private(path: Path, pem: bytes) -> None:
    """0600 from the first byte, written beside the target and linked into place, so a reader
    never sees half a key and two writers never both win."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # created meanwhile by another process: keep theirs
    finally:
        tmp.unlink()


def _pem(private: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_path(private_path: Path) -> Path:
    return private_path.with_suffix(".pub")


def _write_public(path: Path, private) -> None:
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(pem)
    tmp.replace(path)


def init_keys(folder: Path, clients: Iterable[str]) -> list[Path]:
    """Create every missing key pair (existing ones are kept) and its `.pub` file; returns the
    private key files created."""
    wanted: dict[Path, type] = {
        folder / f"{AGGREGATOR}.x25519.pem": X25519PrivateKey,
        folder / f"{AGGREGATOR}.ed25519.pem": Ed25519PrivateKey,
    }
    wanted.update({folder / "clients" / f"{c}.x25519.pem": X25519PrivateKey for c in clients})
    created = []
    for path, kind in wanted.items():
        if not path.exists() and not _public_path(path).exists():
            _write_private(path, _pem(kind.generate()))
            created.append(path)
        if path.exists() and not _public_path(path).exists():
            _write_public(_public_path(path), _load_private(path))
    return created


def _load_private(path: Path):
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path}: private key is readable by others (mode {mode:o}); chmod 600 it")
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _load_pair(private_path: Path):
    """(public key, private key or None): every public key must be there, private ones only
    for the parties this process plays."""
    private = _load_private(private_path) if private_path.exists() else None
    public_path = _public_path(private_path)
    if public_path.exists():
        public = serialization.load_pem_public_key(public_path.read_bytes())
        if private is not None and fingerprint(private.public_key()) != fingerprint(public):
            raise ValueError(f"{public_path}: does not match the private key {private_path.name}")
        return public, private
    if private is None:
        raise FileNotFoundError(f"{public_path}: missing key (and no {private_path.name}); run `fedlib keys init CONFIG`")
    return private.public_key(), private


def load_keyring(folder: Path, clients: Iterable[str]) -> KeyRing:
    """Every party's public key and whatever private keys `folder` holds; a missing public key
    is an error that names its file."""
    aggregator_public, aggregator_private = _load_pair(folder / f"{AGGREGATOR}.x25519.pem")
    signing_public, signing_private = _load_pair(folder / f"{AGGREGATOR}.ed25519.pem")
    pairs = {c: _load_pair(folder / "clients" / f"{c}.x25519.pem") for c in clients}
    return KeyRing(
        aggregator_public=aggregator_public,
        signing_public=signing_public,
        client_public={c: public for c, (public, _) in pairs.items()},
        aggregator_private=aggregator_private,
        signing_private=signing_private,
        client_private={c: private for c, (_, private) in pairs.items() if private is not None},
    )
