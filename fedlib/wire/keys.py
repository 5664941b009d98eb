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

import base64
import binascii
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
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


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
    wanted: dict[Path, type[X25519PrivateKey] | type[Ed25519PrivateKey]] = {
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
    _refuse_shared(path)
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _load_pair(private_path: Path):
    """(public key, private key or None): every public key must be there, private ones only
    for the parties this process plays."""
    private = _load_private(private_path) if private_path.exists() else None
    public_path = _public_path(private_path)
    if public_path.exists():
        public = serialization.load_pem_public_key(public_path.read_bytes())
        if not isinstance(public, X25519PublicKey | Ed25519PublicKey):
            raise ValueError(f"{public_path}: not an X25519 or Ed25519 public key")
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


# ---- One party, one machine: public halves travel in the config, the private half stays home. ----

KEY_SOURCES = ("file", "env", "secret")


@dataclass(frozen=True)
class PublicKeys:
    """Every party's public key, as the federation's config lists them (base64 of the raw 32
    bytes): what each machine needs to seal for, verify, and check who it talks to."""

    aggregator_exchange: X25519PublicKey
    aggregator_signing: Ed25519PublicKey
    clients: dict[str, X25519PublicKey]


def public_text(key: X25519PublicKey | Ed25519PublicKey) -> str:
    """The form a public key takes in the config."""
    return base64.b64encode(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


def parse_public(text: str, kind: type[X25519PublicKey] | type[Ed25519PublicKey], what: str):
    """A config's public key back into a key; anything but 32 base64 bytes is refused by name."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ValueError(f"{what}: not base64") from None
    if len(raw) != 32:
        raise ValueError(f"{what}: {len(raw)} bytes, a public key has 32")
    return kind.from_public_bytes(raw)


def new_party_keys(party: str) -> list[X25519PrivateKey | Ed25519PrivateKey]:
    """The aggregator exchanges (X25519) and signs (Ed25519); a client only exchanges."""
    return [X25519PrivateKey.generate(), Ed25519PrivateKey.generate()] if party == AGGREGATOR else [X25519PrivateKey.generate()]


def party_pem(keys: Iterable[X25519PrivateKey | Ed25519PrivateKey]) -> bytes:
    """One text holding a party's private keys, one PEM block each: what its file, environment
    variable or Secret block holds."""
    return b"".join(_pem(k) for k in keys)


def write_party_key(path: Path, party: str) -> list[X25519PrivateKey | Ed25519PrivateKey]:
    """Make `party`'s keys in `path` (0600); an existing file is never replaced."""
    if path.exists():
        raise FileExistsError(f"{path}: exists; a party's key is made once (delete it to start a new federation)")
    keys = new_party_keys(party)
    _write_private(path, party_pem(keys))
    return keys


def parse_party_pem(text: bytes, party: str) -> tuple[X25519PrivateKey, Ed25519PrivateKey | None]:
    """(exchange key, signing key or None) from a party's PEM text."""
    marker = b"-----BEGIN"
    blocks = [marker + part for part in text.split(marker)[1:]]
    exchange = signing = None
    for block in blocks[:4]:
        try:
            key = serialization.load_pem_private_key(block.strip() + b"\n", password=None)
        except (ValueError, TypeError):
            raise ValueError(f"{party}'s private key: a PEM block does not parse") from None
        if isinstance(key, X25519PrivateKey):
            exchange = key
        elif isinstance(key, Ed25519PrivateKey):
            signing = key
    if exchange is None:
        raise ValueError(f"{party}'s private key: no X25519 key in it")
    if party == AGGREGATOR and signing is None:
        raise ValueError("aggregator's private key: no Ed25519 signing key in it")
    return exchange, signing


def read_key_source(source: str, party: str, read_secret=None) -> bytes:
    """`file:PATH` (0600, `~` is this machine's user's home), `env:VAR`, or `secret:BLOCK` (a
    Prefect Secret block, read through `read_secret`, which the Prefect side passes in).
    `{party}` in the source is the party's name."""
    scheme, _, name = source.partition(":")
    name = name.replace("{party}", party)
    if scheme == "file":
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{party}'s private key: {path} does not exist on this machine; run `fedlib keys init --party {party}`")
        _refuse_shared(path)
        return path.read_bytes()
    if scheme == "env":
        value = os.environ.get(name)
        if not value:
            raise KeyError(f"{party}'s private key: environment variable {name} is not set")
        return value.encode()
    if scheme == "secret":
        if read_secret is None:
            raise ValueError(f"{party}'s private key: Secret block {name!r} can only be read from a Prefect task")
        return str(read_secret(name)).encode()
    raise ValueError(f"key source {source!r}: expected file:PATH, env:VAR or secret:BLOCK")


def _refuse_shared(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(f"{path}: private key is readable by others (mode {mode:o}); chmod 600 it")


def party_keyring(publics: PublicKeys, party: str | None, private_pem: bytes | None) -> KeyRing:
    """The ring one party's process holds: every public key from the config, and its own private
    key, which must match the public key the config lists for it (a wrong key is named)."""
    exchange = signing = None
    if party is not None and private_pem is not None:
        exchange, signing = parse_party_pem(private_pem, party)
        listed = publics.aggregator_exchange if party == AGGREGATOR else publics.clients.get(party)
        if listed is None:
            raise KeyError(f"no public key for party {party!r} in keyring.clients")
        if fingerprint(exchange.public_key()) != fingerprint(listed):
            raise ValueError(
                f"{party}'s private key (fingerprint {fingerprint(exchange.public_key())}) does not match the public key "
                f"keyring lists for it ({fingerprint(listed)})"
            )
        if signing is not None and fingerprint(signing.public_key()) != fingerprint(publics.aggregator_signing):
            raise ValueError("aggregator's signing key does not match keyring.aggregator.signing")
    is_aggregator = party == AGGREGATOR
    return KeyRing(
        aggregator_public=publics.aggregator_exchange,
        signing_public=publics.aggregator_signing,
        client_public=dict(publics.clients),
        aggregator_private=exchange if is_aggregator else None,
        signing_private=signing if is_aggregator else None,
        client_private={party: exchange} if party is not None and exchange is not None and not is_aggregator else {},
    )
