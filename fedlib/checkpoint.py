"""Global adapters and round manifests: the federation's durable state.

A round is committed when its manifest exists; the adapter is written first, so a crash between
the two leaves an uncommitted round that the next run simply redoes. `round-0000` is the initial
adapter drawn from the seed, with the base model's evaluation.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlib import storage
from fedlib.serialization import bytes_to_tensors, tensors_to_bytes

Tensors = dict[str, torch.Tensor]
_ROUND_DIR = re.compile(r"round-(\d{4,})$")


class ManifestSignatureError(ValueError):
    """A manifest whose signature does not verify: someone other than the aggregator wrote it."""


@dataclass(frozen=True)
class CheckpointStore:
    root: str  # URL of this federation's checkpoint folder
    signer: Ed25519PrivateKey | None = None  # the aggregator's; commits are signed with it
    verifier: Ed25519PublicKey | None = None  # everyone's; reads are checked with it

    def round_url(self, round_number: int) -> str:
        return storage.join(self.root, f"round-{round_number:04d}")

    def adapter_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "adapter.safetensors")

    def manifest_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "manifest.json")

    def signature_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "manifest.sig")

    def strategy_state_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "strategy-state.safetensors")

    def commit(
        self, round_number: int, adapter: Tensors, manifest: dict[str, Any], strategy_state: Tensors | None = None
    ) -> dict[str, Any]:
        """Adapter (and the strategy's state, if it keeps any) first, manifest last; the
        manifest records their digests."""
        data = tensors_to_bytes(adapter, metadata={"round": str(round_number)})
        storage.write_atomic(self.adapter_url(round_number), data)
        manifest = {**manifest, "round": round_number, "adapter_sha256": hashlib.sha256(data).hexdigest()}
        if strategy_state:
            state = tensors_to_bytes(strategy_state, metadata={"round": str(round_number)})
            storage.write_atomic(self.strategy_state_url(round_number), state)
            manifest["strategy_state_sha256"] = hashlib.sha256(state).hexdigest()
        body = json.dumps(manifest, indent=2).encode()
        if self.signer is not None:  # the signature first: the manifest is the commit point
            storage.write_atomic(self.signature_url(round_number), self.signer.sign(body))
        storage.write_atomic(self.manifest_url(round_number), body)
        return manifest

    def latest_round(self) -> int | None:
        fs, path = fsspec.url_to_fs(self.root)
        if not fs.exists(path):
            return None
        rounds = []
        for entry in fs.ls(path, detail=False):
            match = _ROUND_DIR.search(entry.rstrip("/"))
            if match and fs.exists(f"{entry.rstrip('/')}/manifest.json"):
                rounds.append(int(match.group(1)))
        return max(rounds, default=None)

    def manifest(self, round_number: int) -> dict[str, Any]:
        body = storage.read_bytes(self.manifest_url(round_number))
        if self.verifier is not None:
            try:
                self.verifier.verify(storage.read_bytes(self.signature_url(round_number)), body)
            except (InvalidSignature, FileNotFoundError):
                raise ManifestSignatureError(
                    f"{self.manifest_url(round_number)}: signature missing or not the aggregator's"
                ) from None
        return json.loads(body)

    def adapter(self, round_number: int) -> Tensors:
        """A committed global adapter, checked against its manifest's digest."""
        return self.adapter_download(round_number)[0]

    def adapter_download(self, round_number: int) -> tuple[Tensors, int]:
        """The adapter and how many bytes were read for it (what a client downloads)."""
        data = storage.read_bytes(self.adapter_url(round_number))
        expected = self.manifest(round_number)["adapter_sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{self.adapter_url(round_number)}: digest does not match its manifest")
        return bytes_to_tensors(data), len(data)

    def strategy_state(self, round_number: int) -> Tensors:
        """The server optimiser's state after `round_number` (empty for stateless strategies)."""
        expected = self.manifest(round_number).get("strategy_state_sha256")
        if expected is None:
            return {}
        data = storage.read_bytes(self.strategy_state_url(round_number))
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{self.strategy_state_url(round_number)}: digest does not match its manifest")
        return bytes_to_tensors(data)

    def manifests(self) -> list[dict[str, Any]]:
        latest = self.latest_round()
        if latest is None:
            return []
        return [self.manifest(r) for r in range(latest + 1) if storage.exists(self.manifest_url(r))]


@dataclass(frozen=True)
class RoundPlan:
    first: int  # first round this run trains
    last: int  # last round this run trains (inclusive)
    resumed: bool


def plan_rounds(store: CheckpointStore, rounds: int) -> RoundPlan:
    """A run trains `rounds` rounds after the latest commit, unless an earlier run stopped short
    of its own target: then this run finishes that one, so no round is lost or counted twice."""
    latest = store.latest_round()
    if latest is None:
        return RoundPlan(first=1, last=rounds, resumed=False)
    target = store.manifest(latest).get("target_round", latest)
    if latest < target:
        return RoundPlan(first=latest + 1, last=target, resumed=True)
    return RoundPlan(first=latest + 1, last=latest + rounds, resumed=False)
