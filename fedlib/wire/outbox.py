"""What a client tells the aggregator besides its update: its secure-aggregation setup and
reveal. A client's run on another cloud shares no result store with the aggregator, so these
travel the way updates do: sealed under the client–aggregator key, bound to the federation,
round, client, session and kind of message, written to the client's own bucket, and read back
by the aggregator through the decode boundary (bounded size, authenticated before parsed)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlib.wire import storage
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.wire.layout import message_url
from fedlib.wire.storage import Options

MAX_MESSAGE_BYTES = 1 << 20


@dataclass(frozen=True)
class Outbox:
    """One client's messages for one round, under `<client bucket>/<federation>/round-NNNN/`."""

    root: str  # the round's folder in the client's bucket
    federation: str
    round: int
    client: str
    key: UpdateKey
    options: Options | None = None

    def _where(self, kind: str, session: str) -> tuple[str, EnvelopeContext]:
        url = message_url(self.root, self.client, kind, session)
        return url, EnvelopeContext(self.federation, self.round, self.client, f"{session}/{kind}")

    def post(self, kind: str, session: str, body: bytes) -> str:
        url, ctx = self._where(kind, session)
        storage.write_atomic(url, seal(body, self.key, ctx), self.options)
        return url

    def fetch(self, kind: str, session: str) -> tuple[bytes, int]:
        """The message, authenticated, and the bytes read for it (what crossed from the client's
        cloud); any failure is an `UpdateRejected` naming why."""
        url, ctx = self._where(kind, session)
        sealed = storage.read_limited(url, MAX_MESSAGE_BYTES, self.options)
        return open_sealed(sealed, self.key, ctx), len(sealed)
