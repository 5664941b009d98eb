"""Global adapters and round manifests: the federation's durable state.

A round is committed when its manifest exists; the adapter is written first (named by its
digest), so a crash between the two leaves an uncommitted round that the next run simply redoes.
The manifest and the aggregator's signature of it are one object, `round-NNNN/manifest.json`
({"manifest": the JSON text, "signature": hex}), created only where there is none: two runs
racing to commit the same round cannot both succeed. Beside it the winner writes `head.json`, the
part a client reads (`ManifestHead`), signed the same way. `round-0000` is the initial adapter
drawn from the seed. The held-out score of each round's adapter (round 0's is the base model's)
is written after the commit, as its own signed record (`score.json`, a `RoundScore`) naming the
adapter it scored: the next round need not wait for it. A round without one is simply unscored;
the aggregator scores it again on resume.

Whoever holds the bucket can copy, delete or restore objects, so a signature alone proves only
that the aggregator wrote a manifest *once*, not that it belongs here. Every read therefore checks
that the signed body names this federation and this round, and the lineage is a chain: round r's
manifest names the digest of round r−1's adapter (`parent_adapter_sha256`), and the latest round
is the end of the longest chain from round 0 that verifies link by link. Round 1's files copied
into round 97's slot, or another federation's manifests signed with a shared key, are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlib.rejection import Reason, UpdateRejected
from fedlib.round.manifest import (
    Manifest,
    ManifestHead,
    RoundScore,
    head_from_json,
    head_to_json,
    manifest_from_json,
    score_from_json,
    score_to_json,
    to_json,
)
from fedlib.round.registered import FilesNotPinned, RegisteredFiles, registered_from_json, registered_to_json
from fedlib.wire import storage
from fedlib.wire.decode import expect, parse_json
from fedlib.wire.layout import CheckpointLayout
from fedlib.wire.serialization import bytes_to_tensors, tensors_to_bytes

Tensors = dict[str, torch.Tensor]
_ROUND_DIR = re.compile(r"round-(\d{4,})$")
_MAX_MANIFEST = 16 << 20
log = logging.getLogger("fedlib.round.checkpoint")
_Signed = TypeVar("_Signed", Manifest, ManifestHead, RoundScore, RegisteredFiles)


class ManifestRejected(ValueError):
    """A manifest that is not this federation's commit of this round."""


class ManifestSignatureError(ManifestRejected):
    """A manifest whose signature does not verify: someone other than the aggregator wrote it."""


class RoundAlreadyCommitted(ManifestRejected):
    """Another run committed this round first; its commit stands."""


@dataclass(frozen=True)
class CheckpointStore:
    root: str  # URL of this federation's checkpoint folder (any fsspec URL: file, s3, gs, az)
    federation: str  # every manifest read must name it
    signer: Ed25519PrivateKey | None = None  # the aggregator's; commits are signed with it
    verifier: Ed25519PublicKey | None = None  # everyone's; reads are checked with it
    options: storage.Options | None = None  # the fsspec options of the store (credentials resolved by the caller)

    @property
    def layout(self) -> CheckpointLayout:
        return CheckpointLayout(self.root)

    def round_url(self, round_number: int) -> str:
        return self.layout.round_url(round_number)

    def adapter_url(self, round_number: int, digest: str) -> str:
        return self.layout.adapter_url(round_number, digest)

    def manifest_url(self, round_number: int) -> str:
        return self.layout.manifest_url(round_number)

    def head_url(self, round_number: int) -> str:
        return self.layout.head_url(round_number)

    def score_url(self, round_number: int) -> str:
        return self.layout.score_url(round_number)

    def _signed(self, body: dict) -> bytes:
        text = json.dumps(body, separators=(",", ":"))
        signature = self.signer.sign(text.encode()).hex() if self.signer is not None else ""
        return json.dumps({"manifest": text, "signature": signature}, separators=(",", ":")).encode()

    def strategy_state_url(self, round_number: int, digest: str) -> str:
        return self.layout.strategy_state_url(round_number, digest)

    def broadcast_url(self, round_number: int, digest: str) -> str:
        return self.layout.broadcast_url(round_number, digest)

    def commit(
        self, adapter: Tensors, manifest: Manifest, strategy_state: Tensors | None = None, broadcast: bytes | None = None
    ) -> Manifest:
        """Adapter (and the strategy's state, if it keeps any, and the compressed change a
        client downloads instead of the adapter, if sent) first, manifest last; the manifest
        records their digests and sizes. It must name this federation, and (after
        round 0) the digest of the committed adapter it was aggregated from.

        The signed manifest is one object, created only if the round has none (a conditional
        create on every store): of two runs committing the same round, one wins and the other
        gets `RoundAlreadyCommitted`, so no round is ever committed twice. A retry of the same
        commit (same manifest, same key) finds its own bytes there and goes on to the head."""
        round_number = manifest.round
        if manifest.federation != self.federation:
            raise ManifestRejected(f"a manifest of federation {manifest.federation!r} committed to {self.federation!r}")
        parent = manifest.parent_adapter_sha256 if round_number > 0 else ""
        if round_number > 0 and parent != self.manifest_read(round_number - 1)[0].adapter_sha256:
            raise ManifestRejected(f"round {round_number} was not aggregated from round {round_number - 1}'s committed adapter")
        data = tensors_to_bytes(adapter, metadata={"round": str(round_number)})
        digest = hashlib.sha256(data).hexdigest()
        storage.write_atomic(self.adapter_url(round_number, digest), data, self.options)
        manifest = replace(manifest, parent_adapter_sha256=parent, adapter_sha256=digest, adapter_bytes=len(data))
        if strategy_state:
            state = tensors_to_bytes(strategy_state, metadata={"round": str(round_number)})
            state_digest = hashlib.sha256(state).hexdigest()
            storage.write_atomic(self.strategy_state_url(round_number, state_digest), state, self.options)
            manifest = replace(manifest, strategy_state_sha256=state_digest, strategy_state_bytes=len(state))
        if broadcast is not None:
            broadcast_digest = hashlib.sha256(broadcast).hexdigest()
            storage.write_atomic(self.broadcast_url(round_number, broadcast_digest), broadcast, self.options)
            manifest = replace(manifest, broadcast_sha256=broadcast_digest, broadcast_bytes=len(broadcast))
        signed = self._signed(to_json(manifest))
        if not storage.write_exclusive(self.manifest_url(round_number), signed, self.options) and not self._landed(round_number, signed):
            raise RoundAlreadyCommitted(f"{self.manifest_url(round_number)}: round {round_number} is already committed")
        # Only the run whose manifest won writes the head; a crash before it leaves none, and readers fall back.
        storage.write_atomic(self.head_url(round_number), self._signed(head_to_json(manifest.head())), self.options)
        return manifest

    def _landed(self, round_number: int, signed: bytes) -> bool:
        """Whether the round's manifest is these very bytes: an earlier try of this commit whose
        write landed though its answer was lost (signatures are deterministic, so the same
        manifest signs to the same bytes; another run's manifest differs at least in its run)."""
        try:
            return storage.read_limited(self.manifest_url(round_number), len(signed), self.options) == signed
        except UpdateRejected:  # none there (a store that lost it), or longer than ours
            return False

    def commit_score(self, score: RoundScore) -> None:
        """A committed round's score record, signed. Scoring the same adapter again gives the
        same score, so a rerun (after a crash, or over a record someone damaged) overwrites it."""
        manifest = self.manifest_read(score.round)[0]
        if score.federation != self.federation or score.adapter_sha256 != manifest.adapter_sha256:
            raise ManifestRejected(f"a score of {score.federation!r} round {score.round} names an adapter its manifest does not")
        storage.write_atomic(self.score_url(score.round), self._signed(score_to_json(score)), self.options)

    def commit_registered(self, record: RegisteredFiles) -> None:
        """The signed record of a round's registered version's files (`fedlib.round.registered`);
        registering the round again writes it again."""
        manifest = self.manifest_read(record.round)[0]
        if record.federation != self.federation or record.adapter_sha256 != manifest.adapter_sha256:
            raise ManifestRejected(
                f"a registered version of {record.federation!r} round {record.round} names an adapter its manifest does not"
            )
        storage.write_atomic(self.layout.registered_url(record.round), self._signed(registered_to_json(record)), self.options)

    def registered_of(self, manifest: Manifest) -> RegisteredFiles:
        """The verified record of the files registered for `manifest`'s round, or `FilesNotPinned`."""
        url = self.layout.registered_url(manifest.round)
        try:
            record = self._read_signed(url, registered_from_json, manifest.round)[0]
        except FileNotFoundError:
            raise FilesNotPinned(
                f"round {manifest.round} has no signed record of its registered files ({url}); register it again"
            ) from None
        except ManifestRejected as err:
            raise FilesNotPinned(f"round {manifest.round}: {err}") from None
        if record.adapter_sha256 != manifest.adapter_sha256:
            raise FilesNotPinned(f"round {manifest.round}: the record of its registered files names another adapter")
        return record

    def score_of(self, manifest: Manifest) -> RoundScore | None:
        """The round's verified score record; None if it has none yet, or one that is not the
        aggregator's score of this federation, round and adapter (logged, and left unscored)."""
        try:
            score = self._read_signed(self.score_url(manifest.round), score_from_json, manifest.round)[0]
        except FileNotFoundError:
            return None
        except ManifestRejected as err:
            log.warning("score of round %d ignored: %s", manifest.round, err)
            return None
        if score.adapter_sha256 != manifest.adapter_sha256:
            log.warning("score of round %d ignored: it scored adapter %s…, not the round's", manifest.round, score.adapter_sha256[:16])
            return None
        return score

    def scored(self, manifest: Manifest) -> Manifest:
        """`manifest` with its verified score joined (`Manifest.with_score`), or as it is if it has none."""
        score = self.score_of(manifest)
        return manifest if score is None else manifest.with_score(score)

    def _listed_rounds(self) -> list[int]:
        fs, path = storage.filesystem(self.root, self.options)
        fs.invalidate_cache()
        if not fs.exists(path):
            return []
        rounds = []
        for entry in fs.ls(path, detail=False):
            match = _ROUND_DIR.search(entry.rstrip("/"))
            if match and fs.exists(f"{entry.rstrip('/')}/manifest.json"):
                rounds.append(int(match.group(1)))
        return sorted(rounds)

    def manifests(self) -> list[Manifest]:
        """The committed lineage, round 0 first: each manifest verified, and each naming its
        predecessor's adapter, with its verified score joined (`scored`). It ends at the first
        round that is missing or does not link; anything listed past that is not this lineage's,
        and is reported, never used."""
        chain: list[Manifest] = []
        listed = self._listed_rounds()
        for round_number in listed:
            if round_number != len(chain):
                break
            try:
                manifest = self.manifest_read(round_number)[0]
            except ManifestRejected as err:
                log.warning("checkpoint round %d ignored: %s", round_number, err)
                break
            if chain and manifest.parent_adapter_sha256 != chain[-1].adapter_sha256:
                log.warning("checkpoint round %d ignored: it does not follow round %d's adapter", round_number, round_number - 1)
                break
            chain.append(self.scored(manifest))
        if len(chain) < len(listed):
            log.warning("checkpoints past round %d are not part of the lineage: %s", len(chain) - 1, listed[len(chain) :][:5])
        return chain

    def latest_round(self) -> int | None:
        """The end of the verified chain (None before round 0 is committed)."""
        chain = self.manifests()
        return chain[-1].round if chain else None

    def manifest(self, round_number: int) -> Manifest:
        """The signed manifest of `round_number`, refused unless it names this federation and
        this round (a signature says who wrote it, not where it belongs), with its score joined."""
        return self.scored(self.manifest_read(round_number)[0])

    def manifest_read(self, round_number: int) -> tuple[Manifest, int]:
        """The signed manifest alone (no score), and how many bytes were read for it (a client
        counts what it downloads)."""
        return self._read_signed(self.manifest_url(round_number), manifest_from_json, round_number)

    def head_read(self, round_number: int) -> tuple[ManifestHead, int]:
        """What a client needs of a committed round (`ManifestHead`), verified as a manifest is,
        and the bytes read for it; from the manifest itself if the round has no head (a commit
        that crashed between the two, or a store written before heads)."""
        try:
            return self._read_signed(self.head_url(round_number), head_from_json, round_number)
        except FileNotFoundError:
            manifest, size = self.manifest_read(round_number)
            return manifest.head(), size

    def _read_signed(self, url: str, parse: Callable[[object], _Signed], round_number: int) -> tuple[_Signed, int]:
        """A signed record (manifest, head or score) of `round_number`, and its size. A signature says
        who wrote a record, not where it belongs, so it must also name this federation and round."""
        body, size = self._verified_body(url)
        try:
            record = parse(body)
        except ValueError as err:
            raise ManifestRejected(f"{url}: {err}") from None
        if record.federation != self.federation or record.round != round_number:
            raise ManifestRejected(
                f"{url}: signed for federation {record.federation!r} round {record.round!r}, not {self.federation!r} round {round_number}"
            )
        return record, size

    def _verified_body(self, url: str) -> tuple[object, int]:
        """The JSON body of a signed record at `url`, its signature checked, and its size."""
        try:
            raw = storage.read_limited(url, _MAX_MANIFEST, self.options)
            record = expect(parse_json(raw, "manifest", _MAX_MANIFEST, 1), dict, "manifest")
            body, signature = expect(record.get("manifest"), str, "manifest body"), expect(record.get("signature"), str, "signature")
        except UpdateRejected as err:
            if err.reason is Reason.MISSING:
                raise FileNotFoundError(url) from None
            raise ManifestRejected(f"{url}: {err.detail}") from None
        if self.verifier is not None:
            try:
                self.verifier.verify(bytes.fromhex(signature), body.encode())
            except (InvalidSignature, ValueError):
                raise ManifestSignatureError(f"{url}: signature missing or not the aggregator's") from None
        try:
            return parse_json(body, "manifest", _MAX_MANIFEST, max_depth=8, constants=True), len(raw)
        except UpdateRejected as err:
            raise ManifestRejected(f"{url}: {err.detail}") from None

    def last_accepted_round(self, client: str, before: int) -> int | None:
        """The last round before `before` whose committed manifest accepted `client`'s update."""
        for round_number in range(before - 1, 0, -1):
            if client in self.head_read(round_number)[0].accepted:
                return round_number
        return None

    def adapter(self, round_number: int) -> Tensors:
        """A committed global adapter, checked against its manifest's digest."""
        return self.adapter_of(self.manifest_read(round_number)[0])[0]

    def _verified(self, url: str, digest: str, size: int) -> bytes:
        """An object the manifest names by digest and size: never more than that size is read."""
        data = storage.read_limited(url, size, self.options)
        if hashlib.sha256(data).hexdigest() != digest:
            raise ManifestRejected(f"{url}: digest does not match its manifest")
        return data

    def adapter_of(self, manifest: Manifest | ManifestHead) -> tuple[Tensors, int]:
        """The adapter a verified manifest names, and how many bytes were read for it (what a
        client downloads). Taking the manifest, not the round, spares its callers a second read
        and verification of it."""
        url = self.adapter_url(manifest.round, manifest.adapter_sha256)
        data = self._verified(url, manifest.adapter_sha256, manifest.adapter_bytes)
        return bytes_to_tensors(data), len(data)

    def broadcast_of(self, manifest: Manifest | ManifestHead) -> bytes:
        """The compressed change a verified manifest names (`fedlib.round.broadcast`)."""
        if not manifest.broadcast_sha256:
            raise FileNotFoundError(f"round {manifest.round} sent no broadcast")
        url = self.broadcast_url(manifest.round, manifest.broadcast_sha256)
        return self._verified(url, manifest.broadcast_sha256, manifest.broadcast_bytes)

    def strategy_state_of(self, manifest: Manifest) -> Tensors:
        """The server optimiser's state the manifest names (empty for stateless strategies)."""
        if manifest.strategy_state_sha256 is None or manifest.strategy_state_bytes is None:
            return {}
        url = self.strategy_state_url(manifest.round, manifest.strategy_state_sha256)
        return bytes_to_tensors(self._verified(url, manifest.strategy_state_sha256, manifest.strategy_state_bytes))


@dataclass(frozen=True)
class RunSpan:
    """Which rounds one run of the flow trains."""

    first: int  # first round this run trains
    last: int  # last round this run trains (inclusive)
    resumed: bool


def plan_rounds(chain: Sequence[Manifest], rounds: int) -> RunSpan:
    """A run trains `rounds` rounds after the latest commit of the lineage `chain`
    (`CheckpointStore.manifests`), unless an earlier run stopped short of its own target: then
    this run finishes that one, so no round is lost or counted twice."""
    if not chain:
        return RunSpan(first=1, last=rounds, resumed=False)
    latest = chain[-1].round
    target = chain[-1].target_round
    if latest < target:
        return RunSpan(first=latest + 1, last=target, resumed=True)
    return RunSpan(first=latest + 1, last=latest + rounds, resumed=False)
