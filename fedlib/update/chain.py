"""The path an update takes, as one chain of filters assembled once from the config:

    client      residual → clip → mask | codecs → serialise → compress → seal
    aggregator  open → decompress → decode boundary → unmask-sum | decode → check

The client's tensor filters are small values with `send`, run in order by `send_update`; each
knows the part of the config it uses and nothing else. What a lossy filter (codecs, low-bit
masked codes) will let the aggregator count is recorded on the way, so error feedback's next
residual is what the chain actually lost. The byte filters (`wire_payload`, then the envelope's
`seal`) close the chain. The aggregator walks it back in `open_client_update` (plain updates) or
`fedlib.round.secure_aggregator.open_masked_update` (masked ones, whose sum is decoded once), and
both directions of the mask filter read one weight rule (`fedlib.secagg.weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from fedlib.codecs import CodecChain, SizeBound
from fedlib.privacy.dp import clip_update_inplace
from fedlib.secagg.client import MaskSettings, SecureRound, masked_update
from fedlib.strategies import ClientUpdate
from fedlib.update.validation import check_update
from fedlib.wire.decode import bounded_int, load_tensors
from fedlib.wire.envelope import EnvelopeContext, UpdateKey, open_sealed
from fedlib.wire.serialization import tensors_to_bytes

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Outgoing:
    """An update on its way out. `delta` is the update as the filters so far made it; `wire`,
    once a wire filter ran, is what will be serialised, with `metadata` beside it; `counted` is
    the delta as the aggregator will count it, when a filter loses part of it."""

    delta: Tensors
    metadata: dict[str, str] = field(default_factory=dict)
    wire: Tensors | None = None
    counted: Tensors | None = None

    @property
    def residual(self) -> Tensors | None:
        """What the chain lost: the next round's error feedback."""
        if self.counted is None:
            return None
        return {name: self.delta[name] - self.counted[name] for name in self.delta}


class Filter(Protocol):
    def send(self, update: Outgoing) -> Outgoing: ...


@dataclass(frozen=True)
class AddResidual:
    """Error feedback (Seide et al., 2014; Karimireddy et al., 2019): what the chain lost in the
    client's last accepted round goes out with this one."""

    carried: Mapping[str, torch.Tensor]

    def send(self, update: Outgoing) -> Outgoing:
        delta = dict(update.delta)
        for name, value in self.carried.items():
            if name in delta and value.shape == delta[name].shape:
                delta[name] = delta[name] + value
        return replace(update, delta=delta)


@dataclass(frozen=True)
class Clip:
    """DP's clip, on the client: the unclipped update never leaves it (the aggregator clips again)."""

    norm: float

    def send(self, update: Outgoing) -> Outgoing:
        delta = {name: value.clone() for name, value in update.delta.items()}
        clip_update_inplace(delta, self.norm)
        return replace(update, delta=delta)


@dataclass(frozen=True)
class Encode:
    """The configured codecs; the description of each step travels in the metadata."""

    chain: CodecChain
    rounding: torch.Generator

    def send(self, update: Outgoing) -> Outgoing:
        wire, description = self.chain.encode(update.delta, self.rounding)
        counted = self.chain.decode(wire, description, update.delta) if self.chain.lossy else None
        return replace(update, wire=wire, metadata={**update.metadata, "codecs": description}, counted=counted)


@dataclass(frozen=True)
class Mask:
    """Secure aggregation: the delta weighted by the round's weight rule, coded, and masked."""

    settings: MaskSettings
    client: str
    num_examples: int
    local_steps: int
    secure: SecureRound
    rounding: torch.Generator

    def send(self, update: Outgoing) -> Outgoing:
        masked = masked_update(self.settings, self.client, update.delta, self.num_examples, self.local_steps, self.secure, self.rounding)
        metadata = {**update.metadata, "weight": str(masked.weight)}
        return replace(update, wire=masked.tensors, metadata=metadata, counted=masked.counted)


@dataclass(frozen=True)
class ChainSettings:
    """What a client's chain reads of the config, once, at the boundary: the codecs, whether
    what is sent loses part of the update (so error feedback carries the rest), DP's clip norm
    when privacy is on, and masking's settings when secure aggregation is."""

    codecs: CodecChain
    lossy: bool
    clip_norm: float | None
    mask: MaskSettings | None


def client_filters(
    settings: ChainSettings,
    client: str,
    num_examples: int,
    local_steps: int,
    rounding: torch.Generator,
    carried: Mapping[str, torch.Tensor] | None = None,
    secure: SecureRound | None = None,
) -> tuple[Filter, ...]:
    """The chain for one client's round, in the order above: error feedback when the chain is
    lossy and a residual is carried, DP's clip when privacy is on, then masking or the codecs."""
    filters: list[Filter] = []
    if carried is not None and settings.lossy:
        filters.append(AddResidual(carried))
    if settings.clip_norm is not None:
        filters.append(Clip(settings.clip_norm))
    if secure is not None:
        if settings.mask is None:
            raise ValueError("a secure round's chain needs secure_aggregation enabled")
        filters.append(Mask(settings.mask, client, num_examples, local_steps, secure, rounding))
    else:
        filters.append(Encode(settings.codecs, rounding))
    return tuple(filters)


def send_update(filters: tuple[Filter, ...], delta: Tensors, metadata: Mapping[str, str]) -> Outgoing:
    update = Outgoing(delta=dict(delta), metadata=dict(metadata))
    for step in filters:
        update = step.send(update)
    if update.wire is None:
        raise ValueError("the chain ends in no wire filter (codecs or mask)")
    return update


def wire_payload(update: Outgoing, chain: CodecChain) -> bytes:
    """The wire tensors and their metadata, serialised (safetensors, never pickle) and compressed:
    what the envelope seals."""
    assert update.wire is not None
    return chain.compress(tensors_to_bytes(update.wire, metadata=update.metadata))


@dataclass(frozen=True)
class Expected:
    """What the round asked of one client. Counts in an update are the client's own word, so
    they are held to this: a FedAvg weight of 10**400 examples, or more local steps than the
    budget, is a named rejection, not an overflow or a client that outweighs everyone."""

    max_examples: int
    max_local_steps: int
    count_known: bool = False  # max_examples is the shard the aggregator dealt, not the configured cap

    def counts(self, meta: Mapping[str, str]) -> tuple[int, int]:
        """(num_examples, local_steps) from an update's authenticated metadata."""
        return (
            bounded_int(meta, "num_examples", 1, self.max_examples, "update"),
            bounded_int(meta, "local_steps", 1, self.max_local_steps, "update"),
        )


def open_client_update(
    blob: bytes,
    key: UpdateKey,
    ctx: EnvelopeContext,
    template: Tensors,
    expected: Expected,
    chain: CodecChain = CodecChain(),
    max_bytes: int = 1 << 30,
) -> tuple[ClientUpdate, dict[str, str]]:
    """The chain walked back for a plain update: authenticate and decrypt, decompress, decode
    (sizes checked against `template` before tensors are built), then the codecs in reverse, then
    the check against the template; any failure is an `UpdateRejected`. Returns the update and
    its authenticated metadata."""
    payload = chain.decompress(open_sealed(blob, key, ctx), max_bytes)
    tensors, meta = load_tensors(payload, "update", SizeBound.of(template).why_not)
    del payload
    num_examples, local_steps = expected.counts(meta)
    tensors = chain.decode(tensors, meta.get("codecs"), template)
    check_update(tensors, template)
    return ClientUpdate(client=ctx.client, num_examples=num_examples, delta=tensors, local_steps=local_steps), meta
