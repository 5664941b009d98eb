"""The messages of one secure-aggregation round (Bonawitz et al., CCS 2017, with double masking),
relayed by the aggregator, which can open none of the clients' messages to each other.

1. setup: each client derives this round's secrets from its long-term X25519 key and the
   aggregator's fresh session id: a mask key pair, a self-mask seed, and keys for its Shamir
   polynomials. It publishes the mask public key and sends each peer, sealed with their pairwise
   key, that public key and the peer's shares of both secrets.
2. masking: y = encode(x) + PRG(self seed) + Σ_peers ±PRG(pairwise seed), all mod 2^32.
3. reveal: once the aggregator says who survived, each survivor hands it, sealed, the shares of
   every survivor's self seed and of every dropped client's mask key, and never both for one
   client. `threshold` reveals let the aggregator take every mask out of the sum. A client
   answers one reveal per session (its `RevealLedger`, on its own machine, remembers which): a
   second request calling a survivor "dropped" would otherwise hand over both of its secrets.
   The threshold is a strict majority, so two disjoint sets of clients cannot both reach it.

The secrets are derived rather than stored so that the three steps can run as separate
processes (a client's deployment on its own pool) without keeping state between them; a new
session per attempt of a round keeps a re-run round from reusing a mask.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlib.rejection import Reason, UpdateRejected
from fedlib.secagg.fixedpoint import MODULUS, Tensors
from fedlib.secagg.masking import apply_masks, mask_stream, remove_dropped_masks
from fedlib.secagg.messages import SetupMessage
from fedlib.secagg.shamir import PRIME, Share, combine_shares, split_secret
from fedlib.wire.decode import expect, parse_json
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, check_addressed, open_sealed, seal
from fedlib.wire.keys import KeyRing, fingerprint
from fedlib.wire.sealed_stores import RevealLedger


class SecureAggregationFailed(RuntimeError):
    """Too few reveals to take the masks out of the sum (or reveals that do not agree)."""


class BadSetups(RuntimeError):
    """Setup messages this client could not open, by sender. Masking with a peer whose shares it
    does not hold could leave masks nobody can remove, so the client masks nothing and reports
    the senders (`complaint_json`, posted authenticated to the aggregator), which leaves them out
    and runs the round again in a fresh session."""

    def __init__(self, complaints: Mapping[str, str]) -> None:
        self.complaints = dict(complaints)
        super().__init__("setup messages that do not open: " + "; ".join(f"{s}: {w}" for s, w in sorted(self.complaints.items())))

    def complaint_json(self) -> bytes:
        return json.dumps(self.complaints, sort_keys=True).encode()


@dataclass(frozen=True)
class Session:
    """One attempt of one round: every party must agree on all of it."""

    federation: str
    round: int
    id: str  # fresh random hex per attempt, chosen by the aggregator
    clients: tuple[str, ...]  # every configured client, sorted: share x = position + 1
    threshold: int
    # the fewest survivors a round completes with; with DP each client's noise share is scaled to
    # it, so a client reveals for no smaller set (0: the threshold)
    min_survivors: int = 0

    def __post_init__(self) -> None:
        if list(self.clients) != sorted(set(self.clients)):
            raise ValueError("session clients must be sorted and distinct")
        if not 2 <= self.threshold <= len(self.clients) or 2 * self.threshold <= len(self.clients):
            raise ValueError(f"threshold {self.threshold} must be a majority of the {len(self.clients)} clients, and at least 2")

    @property
    def fewest_survivors(self) -> int:
        return max(self.threshold, self.min_survivors)

    @property
    def mask_context(self) -> bytes:
        return f"{self.federation}/round-{self.round}/{self.id}".encode()

    def envelope(self, step: str, sender: str, recipient: str = "aggregator") -> EnvelopeContext:
        return EnvelopeContext(f"{self.federation}/secagg-{step}/{self.id}", self.round, f"{sender}>{recipient}")

    def index(self, client: str) -> int:
        return self.clients.index(client)


@dataclass(frozen=True)
class RoundSecrets:
    mask_private: X25519PrivateKey
    self_seed: bytes
    mask_coefficients: bytes
    self_coefficients: bytes

    def mask_shares(self, session: Session) -> list[Share]:
        return split_secret(_raw(self.mask_private), len(session.clients), session.threshold, self.mask_coefficients)

    def self_shares(self, session: Session) -> list[Share]:
        return split_secret(self.self_seed, len(session.clients), session.threshold, self.self_coefficients)


@dataclass(frozen=True)
class PeerSetup:
    """What a client learned from one peer's setup message."""

    mask_public: X25519PublicKey
    mask_share: Share  # my share of the peer's mask key
    self_share: Share  # my share of the peer's self-mask seed


def _raw(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def round_secrets(ring: KeyRing, me: str, session: Session) -> RoundSecrets:
    """HKDF of the client's long-term private key: unpredictable to anyone else, and the same
    in every step of the session."""
    try:
        long_term = _raw(ring.client_private[me])
    except KeyError:
        raise KeyError(f"no private key for client {me!r} in this key ring") from None
    info = b"fedlib/secagg/round/v1/" + session.mask_context
    material = HKDF(hashes.SHA256(), 128, salt=None, info=info).derive(long_term)
    return RoundSecrets(X25519PrivateKey.from_private_bytes(material[:32]), material[32:64], material[64:96], material[96:128])


def _pair_key(ring: KeyRing, me: str, peer: str, sender: str) -> UpdateKey:
    return UpdateKey(ring.peer_shared_secret(me, peer), fingerprint(ring.public_key(sender)))


def _share_json(share: Share) -> list:
    return [share[0], format(share[1], "x")]


def _share(value: object) -> Share:
    """A share as sent: [x, hex y], x a small positive int, y an element of Shamir's field."""
    if not (isinstance(value, list) and len(value) == 2 and type(value[0]) is int and isinstance(value[1], str)):
        raise ValueError("a share is [x, hex]")
    x, y = value
    if not 0 < x < 1 << 16 or len(y) > 132 or int(y, 16) >= PRIME:
        raise ValueError("share out of range")
    return x, int(y, 16)


def make_setup(ring: KeyRing, me: str, session: Session) -> SetupMessage:
    """The mask public key, and for each peer its shares sealed for that peer alone."""
    secrets = round_secrets(ring, me, session)
    mask_shares, self_shares = secrets.mask_shares(session), secrets.self_shares(session)
    public = _raw(secrets.mask_private.public_key()).hex()
    sealed = {}
    for peer in session.clients:
        if peer == me:
            continue
        i = session.index(peer)
        body = json.dumps({"mask_public": public, "mask_share": _share_json(mask_shares[i]), "self_share": _share_json(self_shares[i])})
        sealed[peer] = bytes(seal(body.encode(), _pair_key(ring, me, peer, me), session.envelope("setup", me, peer))).hex()
    return SetupMessage(public, sealed)


def check_setup(session: Session, sender: str, setup: SetupMessage, participants: Iterable[str]) -> None:
    """The relay's check of a setup it cannot open: one envelope for every other participant,
    addressed from `sender` to that peer in this session. Junk is named here, as the sender's
    (its setup reached the aggregator sealed under its own key, so it is the sender's)."""
    for peer in participants:
        if peer == sender:
            continue
        blob = setup.sealed.get(peer)
        if blob is None:
            raise UpdateRejected(Reason.MALFORMED, f"setup message has nothing for {peer}", sender)
        try:
            check_addressed(bytes.fromhex(blob), session.envelope("setup", sender, peer))
        except ValueError:
            raise UpdateRejected(Reason.MALFORMED, f"setup message for {peer} is not hex", sender) from None
        except UpdateRejected as err:
            raise UpdateRejected(err.reason, f"setup message for {peer}: {err.detail}", sender) from None


def read_complaint(body: bytes, session: Session, author: str) -> dict[str, str]:
    """A client's authenticated complaint: {sender: why}, senders being its peers in the session."""
    data = expect(parse_json(body, f"complaint from {author}", 1 << 16, max_depth=1), dict, "complaint")
    if not data or any(s == author or s not in session.clients or not isinstance(w, str) for s, w in data.items()):
        raise UpdateRejected(Reason.MALFORMED, "a complaint names peers of this session, each with a reason", author)
    return {sender: why[:200] for sender, why in data.items()}


def relay_setups(setups: Mapping[str, SetupMessage]) -> dict[str, dict[str, str]]:
    """The aggregator's relay: each client's inbox, {sender: sealed message for that client}.
    A setup that leaves out a participant is the sender's failure, not the round's."""
    return {me: {sender: s.sealed[me] for sender, s in setups.items() if sender != me and me in s.sealed} for me in setups}


def _open_setup(ring: KeyRing, me: str, session: Session, sender: str, blob: str) -> PeerSetup:
    try:
        body = open_sealed(bytes.fromhex(blob), _pair_key(ring, me, sender, sender), session.envelope("setup", sender, me))
    except ValueError:
        raise UpdateRejected(Reason.MALFORMED, "not hex", sender) from None
    try:
        data = expect(parse_json(body, f"setup message from {sender}", 4096, max_depth=2), dict, "setup message")
        return PeerSetup(
            X25519PublicKey.from_public_bytes(bytes.fromhex(data["mask_public"])), _share(data["mask_share"]), _share(data["self_share"])
        )
    except (ValueError, KeyError, TypeError) as err:
        raise UpdateRejected(Reason.MALFORMED, str(err)[:120], sender) from None


def open_inbox(ring: KeyRing, me: str, session: Session, inbox: Mapping[str, str]) -> dict[str, PeerSetup]:
    """Every peer's message must open, or this client refuses to mask: masking against a set of
    peers the aggregator did not announce would leave masks nobody can remove. Each sender whose
    message does not open is named (`BadSetups`), all of them at once."""
    peers, complaints = {}, {}
    for sender, blob in sorted(inbox.items()):
        if sender == me or sender not in session.clients:
            raise UpdateRejected(Reason.WRONG_CLIENT, f"setup message from {sender!r}, not a peer in this session", sender)
        try:
            peers[sender] = _open_setup(ring, me, session, sender, blob)
        except UpdateRejected as err:
            complaints[sender] = f"{err.reason.value}: {err.detail}"
    if complaints:
        raise BadSetups(complaints)
    if len(peers) + 1 < session.threshold:
        raise SecureAggregationFailed(f"{len(peers) + 1} clients in the session, below the threshold {session.threshold}")
    return peers


def mask_update(ring: KeyRing, me: str, session: Session, peers: Mapping[str, PeerSetup], encoded: Tensors) -> Tensors:
    """encoded + PRG(self seed) + Σ_peers ±PRG(pairwise seed), mod 2^32."""
    secrets = round_secrets(ring, me, session)
    publics = {peer: setup.mask_public for peer, setup in peers.items()}
    masked = apply_masks(encoded, me, secrets.mask_private, publics, session.mask_context)
    self_mask = mask_stream(secrets.self_seed, encoded)
    return {name: (value + self_mask[name]) % MODULUS for name, value in masked.items()}


def make_reveal(
    ring: KeyRing,
    me: str,
    session: Session,
    peers: Mapping[str, PeerSetup],
    survivors: Iterable[str],
    dropped: Iterable[str],
    key: UpdateKey,
    ledger: RevealLedger,
) -> str:
    """My shares of the survivors' self seeds and the dropped clients' mask keys, sealed for
    the aggregator. Revealing both of one client would unmask its input, so overlapping sets
    are refused, as is a survivor list that leaves me out or is smaller than the session's
    fewest survivors (with DP, fewer clients' noise shares than the configured noise), and
    (through `ledger`, which remembers the round's first answer and this session's) any request
    for other sets, in this session or any later one of the round."""
    survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
    if set(survivors) & set(dropped):
        raise ValueError(f"clients both surviving and dropped: {sorted(set(survivors) & set(dropped))}")
    if me not in survivors:
        raise ValueError(f"{me} is asked to reveal but is not among the survivors")
    unknown = (set(survivors) | set(dropped)) - set(peers) - {me}
    if unknown:
        raise ValueError(f"not peers of {me} in this session: {sorted(unknown)}")
    if len(survivors) < session.fewest_survivors:
        raise UpdateRejected(
            Reason.TOO_FEW_SURVIVORS, f"asked to reveal for {len(survivors)} survivors, fewer than the {session.fewest_survivors} required"
        )
    ledger.record(session.id, session.round, survivors, dropped)  # refuses a request that differs from an earlier one
    own = round_secrets(ring, me, session).self_shares(session)[session.index(me)]
    self_shares = {s: _share_json(own if s == me else peers[s].self_share) for s in survivors}
    mask_shares = {d: _share_json(peers[d].mask_share) for d in dropped}
    body = json.dumps({"survivors": survivors, "dropped": dropped, "self_shares": self_shares, "mask_shares": mask_shares})
    return bytes(seal(body.encode(), key, session.envelope("reveal", me))).hex()


def _rebuild(shares: list[Share], threshold: int, what: str) -> bytes:
    if len(shares) < threshold:
        raise SecureAggregationFailed(f"{what}: {len(shares)} shares revealed, threshold is {threshold}")
    return combine_shares(shares[:threshold])


def unmask_sum(
    masked_sum: Tensors,
    session: Session,
    mask_publics: Mapping[str, str],
    survivors: Iterable[str],
    dropped: Iterable[str],
    reveals: Mapping[str, str],
    keys: Mapping[str, UpdateKey],
) -> Tensors:
    """Σ_survivors encode(x) mod 2^32: the survivors' self masks and the masks the survivors
    added towards dropped clients, taken out. A reveal that fails to open, or that was made for
    other survivor/dropped sets, is not counted."""
    survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
    self_shares: dict[str, list[Share]] = {s: [] for s in survivors}
    mask_shares: dict[str, list[Share]] = {d: [] for d in dropped}
    for revealer, blob in sorted(reveals.items()):
        try:
            opened = open_sealed(bytes.fromhex(blob), keys[revealer], session.envelope("reveal", revealer))
            body = expect(parse_json(opened, f"reveal from {revealer}", 1 << 16, max_depth=3), dict, "reveal")
            if body.get("survivors") != survivors or body.get("dropped") != dropped:
                continue
            selfs = [_share(body["self_shares"][s]) for s in survivors]
            masks = [_share(body["mask_shares"][d]) for d in dropped]
        except (UpdateRejected, ValueError, KeyError, TypeError):
            continue
        for s, share in zip(survivors, selfs, strict=False):
            self_shares[s].append(share)
        for d, share in zip(dropped, masks, strict=False):
            mask_shares[d].append(share)

    total = {name: value.clone() for name, value in masked_sum.items()}
    for s in survivors:
        seed = _rebuild(self_shares[s], session.threshold, f"self-mask seed of {s}")
        self_mask = mask_stream(seed, total)
        total = {name: (value - self_mask[name]) % MODULUS for name, value in total.items()}
    survivor_publics = {s: X25519PublicKey.from_public_bytes(bytes.fromhex(mask_publics[s])) for s in survivors}
    for d in dropped:
        key = X25519PrivateKey.from_private_bytes(_rebuild(mask_shares[d], session.threshold, f"mask key of {d}"))
        if _raw(key.public_key()).hex() != mask_publics[d]:
            raise SecureAggregationFailed(f"the rebuilt mask key of {d} does not match its published public key")
        total = remove_dropped_masks(total, d, key, survivor_publics, session.mask_context)
    return total
