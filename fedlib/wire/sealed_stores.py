"""What a client keeps between rounds: the error-feedback residual of its lossy codecs, the last
global it rebuilt, and what it revealed in each secure-aggregation session.

The first two live in the client's own bucket, so they survive a client that runs in a fresh container
each round; they are sealed with a key derived from the client's private key alone: neither
the storage provider nor the aggregator can read it. The envelope binds the round it was written
in, and a client adds back only the residual of the last round whose signed manifest accepted
its update: an older residual restored into the bucket (or one from a round that never counted)
is left out, by name, never added twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.wire.layout import reveal_url, round_reveal_url
from fedlib.wire.serialization import Tensors, bytes_to_tensors, tensors_to_bytes
from fedlib.wire.storage import Options

log = logging.getLogger("fedlib.wire.sealed_stores")
_MAX_RESIDUAL = 1 << 31


@dataclass(frozen=True)
class ResidualStore:
    url: str
    key: UpdateKey
    federation: str
    client: str
    options: Options | None = None

    def _context(self, round_number: int) -> EnvelopeContext:
        return EnvelopeContext(f"{self.federation}/client-state", round_number, self.client)

    def load(self, written_in: int | None) -> Tensors:
        """The residual written in round `written_in`; nothing if there is none, or if what is
        stored is anything else (the residual is an optimisation, and a client must not be
        blocked by losing it, but it must never add back a stale one)."""
        if written_in is None or not storage.exists(self.url, self.options):
            return {}
        try:
            blob = storage.read_limited(self.url, _MAX_RESIDUAL, self.options)
            try:
                payload = open_sealed(blob, self.key, self._context(written_in))
            except UpdateRejected as err:
                if err.reason is Reason.WRONG_ROUND:  # authentic or not, it is not the last accepted round's
                    raise UpdateRejected(Reason.STALE, f"{err.detail}; the last accepted round is {written_in}") from None
                raise
            return bytes_to_tensors(payload)
        except UpdateRejected as err:
            log.warning("client %s: residual left out (%s): %s", self.client, err.reason.value, err.detail)
            return {}

    def sealed(self, round_number: int, residual: Tensors) -> bytes:
        return bytes(seal(tensors_to_bytes(residual), self.key, self._context(round_number)))

    def save(self, blob: bytes) -> None:
        storage.write_atomic(self.url, blob, self.options)


@dataclass(frozen=True)
class CarriedResidual:
    """Where a client's residual lives, and the round whose residual it may add back."""

    store: ResidualStore
    carried_from: int | None  # the client's last accepted round before this one, if any


@dataclass(frozen=True)
class RevealLedger:
    """What a client revealed in secure aggregation, kept on its own machine
    (`fedlib.wire.trust.reveal_folder`: a bucket's objects can be deleted, and a request can name
    another bucket) and sealed under its own key (a client's steps run as separate processes, so
    its memory cannot hold this). Two records, each created once:

    - per round, the survivor and dropped sets of its first reveal in that round, whatever the
      session. A later session of the round is answered only for the same sets: the difference
      of two unmasked sums over different survivors is the update of whoever was left out, and
      with DP only that client's own noise share would hide it. Since a reveal set needs a
      majority, and two majorities share a client, no second set can be unmasked at all.
    - per session, its answer: the same request again is answered the same (a retry); a request
      for other sets is refused, because together the two answers could hold both secrets of
      one peer.

    An entry that does not open counts as an answer given (fail closed: the storage provider
    must not be able to reset it)."""

    root: str  # the client's folder for this federation's secure-aggregation state
    key: UpdateKey
    federation: str
    client: str
    options: Options | None = None

    def record(self, session: str, round_number: int, survivors: list[str], dropped: list[str]) -> None:
        request = json.dumps({"survivors": sorted(survivors), "dropped": sorted(dropped)}, sort_keys=True).encode()
        round_ctx = EnvelopeContext(f"{self.federation}/secagg-reveal-sets", round_number, self.client)
        self._once(round_reveal_url(self.root, self.federation, round_number), round_ctx, request, f"round {round_number}")
        session_ctx = EnvelopeContext(f"{self.federation}/secagg-reveals/{session}", round_number, self.client, session)
        self._once(reveal_url(self.root, session), session_ctx, request, f"session {session}")

    def _once(self, url: str, ctx: EnvelopeContext, request: bytes, where: str) -> None:
        """Record `request` as the first answer at `url`, or refuse one that differs from it."""
        if storage.write_exclusive(url, seal(request, self.key, ctx), self.options):
            return
        try:
            earlier = open_sealed(storage.read_limited(url, 1 << 16, self.options), self.key, ctx)
        except UpdateRejected as err:
            raise UpdateRejected(Reason.ALREADY_REVEALED, f"{where}: a reveal was recorded ({err.reason.value})") from None
        if earlier != request:
            raise UpdateRejected(
                Reason.ALREADY_REVEALED,
                f"{where}: already revealed for {earlier.decode()[:200]}; refusing {request.decode()[:200]}",
            )


@dataclass(frozen=True)
class HeldGlobal:
    """The last global adapter a client rebuilt, kept in its own bucket and sealed under its own
    key, so that next time only the change need cross a cloud (`fedlib.round.broadcast`). It holds the
    adapter's committed bytes: whatever the bucket serves is trusted only if it hashes to a
    digest in a signed manifest."""

    url: str
    key: UpdateKey
    federation: str
    client: str
    options: Options | None = None

    def _context(self) -> EnvelopeContext:
        return EnvelopeContext(f"{self.federation}/held-global", 0, self.client)

    def load(self) -> bytes | None:
        """The held adapter's committed bytes, or None (nothing held, or what is there does not
        open: the client then reads the full adapter)."""
        if not storage.exists(self.url, self.options):
            return None
        try:
            return open_sealed(storage.read_limited(self.url, _MAX_RESIDUAL, self.options), self.key, self._context())
        except UpdateRejected as err:
            log.warning("client %s: held global adapter left out (%s): %s", self.client, err.reason.value, err.detail)
            return None

    def save(self, committed: bytes) -> None:
        storage.write_atomic(self.url, bytes(seal(committed, self.key, self._context())), self.options)
