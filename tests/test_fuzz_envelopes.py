"""A few thousand random, truncated and mutated envelopes through the aggregator's decode path:
every one is rejected with a named reason, none escapes as another exception."""

from __future__ import annotations

import random

import torch

from fedlib.aggregator import open_client_update
from fedlib.envelope import EnvelopeContext, UpdateKey, seal
from fedlib.rejection import Reason, UpdateRejected
from fedlib.serialization import tensors_to_bytes

KEY = UpdateKey(bytes(range(32)), "aws-key-id")
CTX = EnvelopeContext("fed", 2, "aws")
TEMPLATE = {"a.lora_A.weight": torch.zeros(4, 8), "a.lora_B.weight": torch.zeros(8, 4)}


def _valid() -> bytes:
    payload = tensors_to_bytes({k: torch.ones_like(v) for k, v in TEMPLATE.items()}, metadata={"num_examples": "3"})
    return seal(payload, KEY, CTX)


def _mutations(rng: random.Random, valid: bytes):
    header_end = valid.index(b"}") + 1
    for _ in range(800):  # random bytes, some behind a valid magic
        blob = rng.randbytes(rng.randrange(0, 400))
        yield blob if rng.random() < 0.5 else valid[:8] + blob
    for _ in range(800):  # truncations anywhere
        yield valid[: rng.randrange(0, len(valid))]
    for _ in range(1200):  # 1-4 flipped bytes anywhere, header included
        blob = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
        yield bytes(blob)
    for _ in range(400):  # header edits that keep it JSON: numbers, strings, structure
        header = valid[12:header_end]
        edited = header.replace(b'"round":2', rng.choice([b'"round":-1', b'"round":"2"', b'"round":1e9', b'"round":2']))
        edited = edited.replace(b'"length":', rng.choice([b'"length":-', b'"length":9', b'"length":']))
        yield valid[:8] + len(edited).to_bytes(4, "big") + edited + valid[header_end:] + rng.randbytes(rng.randrange(0, 3))
    for _ in range(200):  # valid encryption around broken payloads
        yield seal(rng.randbytes(rng.randrange(0, 300)), KEY, CTX)


def test_every_mutated_envelope_is_rejected_by_name():
    rng = random.Random(20261122)
    valid = _valid()
    assert open_client_update(valid, KEY, CTX, TEMPLATE).num_examples == 3
    seen: dict[Reason, int] = {}
    total = 0
    for blob in _mutations(rng, valid):
        if blob == valid:
            continue
        total += 1
        try:
            open_client_update(blob, KEY, CTX, TEMPLATE)
        except UpdateRejected as err:
            seen[err.reason] = seen.get(err.reason, 0) + 1
        else:
            raise AssertionError(f"accepted a mutated envelope: {blob[:80]!r}")
    assert total >= 3000
    assert {Reason.TRUNCATED, Reason.MALFORMED, Reason.AUTHENTICATION_FAILED} <= seen.keys(), seen
