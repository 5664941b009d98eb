"""Where everything of a federation lives in its buckets: the one place a bucket key is made.

Two trees, each under a root URL (any fsspec URL: `file://`, `s3://`, `gs://`, `az://`):

    <client bucket>/<federation>/round-NNNN/<client>.update          the sealed update
                                 round-NNNN/<client>.<kind>-<session> secure-aggregation messages
                                 client-state/<client>.residual|.global what only the client reads
                                 data/<client>-<partition>.shard       its sealed shard (simulated mode)
    <checkpoints>/<federation>/round-NNNN/manifest.json, head.json, score.json, registered.json  signed by the aggregator
                               round-NNNN/adapter-<sha256[:16]>.safetensors (and strategy state, broadcast)

Before a new lineage's first round each party writes and removes `<store>/.fedlib-preflight-<party>`.
A client's reveal ledger is not in a bucket at all (`fedlib.wire.trust.reveal_folder`).
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass


def join(url: str, *parts: str) -> str:
    return posixpath.join(url.rstrip("/"), *parts)


def round_name(round_number: int) -> str:
    return f"round-{round_number:04d}"


@dataclass(frozen=True)
class Layout:
    """A federation's keys in its clients' buckets. `buckets`: each client's bucket URL."""

    federation: str
    buckets: Mapping[str, str]

    def round_folder(self, client: str, round_number: int) -> str:
        """What `client` writes in round `round_number`, in its own bucket."""
        return join(self.buckets[client], self.federation, round_name(round_number))

    def update_url(self, client: str, round_number: int) -> str:
        return join(self.round_folder(client, round_number), f"{client}.update")

    def client_state_url(self, client: str, what: str) -> str:
        """What only the client reads back (`residual`, `global`): in its own bucket."""
        return join(self.buckets[client], self.federation, "client-state", f"{client}.{what}")

    def shard_url(self, client: str, partition_digest: str) -> str:
        return join(self.buckets[client], self.federation, "data", f"{client}-{partition_digest[:16]}.shard")


def message_url(round_folder: str, client: str, kind: str, session: str) -> str:
    """A secure-aggregation message (`setup`, `reveal`, ...) of one session, in the round's folder."""
    return join(round_folder, f"{client}.{kind}-{session}")


def probe_url(store: str, party: str) -> str:
    """A party's preflight probe, written and removed at the root of a store it writes (its
    bucket, or the checkpoint store) before a new lineage's first round."""
    return join(store, f".fedlib-preflight-{party}")


def reveal_url(ledger_folder: str, session: str) -> str:
    return join(ledger_folder, f"reveal-{session}.sealed")


def round_reveal_url(ledger_folder: str, federation: str, round_number: int) -> str:
    """The survivor set a client first revealed for in a round, whatever the session; named by the
    federation's digest because one key may serve in more than one federation."""
    tag = hashlib.sha256(federation.encode()).hexdigest()[:16]
    return join(ledger_folder, f"round-{tag}-{round_number:06d}.sealed")


@dataclass(frozen=True)
class CheckpointLayout:
    """A federation's checkpoint folder (`<federation.checkpoints>/<id>`). Adapters, strategy
    state and broadcasts are named by content, so a run that loses the race to commit a round
    (or one that crashed before committing) never overwrites what the round's manifest names."""

    root: str

    def round_url(self, round_number: int) -> str:
        return join(self.root, round_name(round_number))

    def manifest_url(self, round_number: int) -> str:
        return join(self.round_url(round_number), "manifest.json")

    def head_url(self, round_number: int) -> str:
        return join(self.round_url(round_number), "head.json")

    def score_url(self, round_number: int) -> str:
        return join(self.round_url(round_number), "score.json")

    def registered_url(self, round_number: int) -> str:
        return join(self.round_url(round_number), "registered.json")

    def adapter_url(self, round_number: int, digest: str) -> str:
        return join(self.round_url(round_number), f"adapter-{digest[:16]}.safetensors")

    def strategy_state_url(self, round_number: int, digest: str) -> str:
        return join(self.round_url(round_number), f"strategy-state-{digest[:16]}.safetensors")

    def broadcast_url(self, round_number: int, digest: str) -> str:
        return join(self.round_url(round_number), f"broadcast-{digest[:16]}.bin")
