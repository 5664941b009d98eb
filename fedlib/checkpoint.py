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

from fedlib import storage
from fedlib.serialization import bytes_to_tensors, tensors_to_bytes

Tensors = dict[str, torch.Tensor]
_ROUND_DIR = re.compile(r"round-(\d{4,})$")


@dataclass(frozen=True)
class CheckpointStore:
    root: str  # URL of this federation's checkpoint folder

    def round_url(self, round_number: int) -> str:
        return storage.join(self.root, f"round-{round_number:04d}")

    def adapter_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "adapter.safetensors")

    def manifest_url(self, round_number: int) -> str:
        return storage.join(self.round_url(round_number), "manifest.json")

    def commit(self, round_number: int, adapter: Tensors, manifest: dict[str, Any]) -> dict[str, Any]:
        """Adapter first, manifest last; the manifest records the adapter's digest."""
        data = tensors_to_bytes(adapter, metadata={"round": str(round_number)})
        storage.write_atomic(self.adapter_url(round_number), data)
        manifest = {**manifest, "round": round_number, "adapter_sha256": hashlib.sha256(data).hexdigest()}
        storage.write_atomic(self.manifest_url(round_number), json.dumps(manifest, indent=2).encode())
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
        return json.loads(storage.read_bytes(self.manifest_url(round_number)))

    def adapter(self, round_number: int) -> Tensors:
        """A committed global adapter, checked against its manifest's digest."""
        data = storage.read_bytes(self.adapter_url(round_number))
        expected = self.manifest(round_number)["adapter_sha256"]
        if hashlib.sha256(data).hexdigest() != expected:
            raise ValueError(f"{self.adapter_url(round_number)}: digest does not match its manifest")
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
