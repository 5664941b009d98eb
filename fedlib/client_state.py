"""What a client keeps between rounds: the error-feedback residual of its lossy codecs.

It lives in the client's own bucket, so it survives a client that runs in a fresh container
each round, and it is sealed with a key derived from the client's private key alone: neither
the storage provider nor the aggregator can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlib import storage
from fedlib.envelope import EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.rejection import UpdateRejected
from fedlib.serialization import Tensors, bytes_to_tensors, read_metadata, tensors_to_bytes
from fedlib.storage import Options


@dataclass(frozen=True)
class ResidualStore:
    url: str
    key: UpdateKey
    federation: str
    client: str
    options: Options | None = None

    @property
    def _context(self) -> EnvelopeContext:
        return EnvelopeContext(f"{self.federation}/client-state", 0, self.client)

    def load_before(self, round_number: int) -> Tensors:
        """The residual left by the client's last round before `round_number`; nothing if it
        never ran, or if the object does not open (the residual is an optimisation, and a
        client must not be blocked by losing it)."""
        if not storage.exists(self.url, self.options):
            return {}
        try:
            payload = open_sealed(storage.read_bytes(self.url, self.options), self.key, self._context)
            if int(read_metadata(payload).get("round", "-1")) >= round_number:
                return {}  # written by a later attempt or a re-run: not this round's past
            return bytes_to_tensors(payload)
        except (UpdateRejected, ValueError):
            return {}

    def sealed(self, round_number: int, residual: Tensors) -> bytes:
        return bytes(seal(tensors_to_bytes(residual, metadata={"round": str(round_number)}), self.key, self._context))

    def save(self, blob: bytes) -> None:
        storage.write_atomic(self.url, blob, self.options)
