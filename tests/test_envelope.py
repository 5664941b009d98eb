"""Serialisation + encryption round trip, and every way a stored update can be wrong."""

from __future__ import annotations

import pytest
import torch

from fedlib.rejection import Reason, UpdateRejected
from fedlib.update.chain import Expected, open_client_update
from fedlib.wire.envelope import MAGIC, EnvelopeContext, UpdateKey, open_sealed, seal
from fedlib.wire.serialization import bytes_to_tensors, read_metadata, tensors_to_bytes

KEY = UpdateKey(bytes(range(32)), "aws-key-id")
CTX = EnvelopeContext("fed", 3, "aws")
TEMPLATE = {"layer.lora_A.weight": torch.zeros(4, 16), "layer.lora_B.weight": torch.zeros(16, 4)}
LIMITS = Expected(max_examples=100, max_local_steps=10)


def _update(scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=gen) * scale for k, v in TEMPLATE.items()}


def _sealed(tensors=None, examples: str = "12", ctx: EnvelopeContext = CTX, key: UpdateKey = KEY) -> bytes:
    payload = tensors_to_bytes(_update() if tensors is None else tensors, metadata={"num_examples": examples, "local_steps": "1"})
    return seal(payload, key, ctx)


def _reason(blob: bytes, ctx: EnvelopeContext = CTX, key: UpdateKey = KEY) -> Reason:
    with pytest.raises(UpdateRejected) as info:
        open_client_update(blob, key, ctx, TEMPLATE, LIMITS)
    assert info.value.reason.value in str(info.value)  # the message names the reason
    return info.value.reason


def test_round_trip_is_exact():
    tensors = _update()
    payload = tensors_to_bytes(tensors, metadata={"num_examples": "12", "local_steps": "1"})
    assert read_metadata(payload) == {"num_examples": "12", "local_steps": "1"}
    blob = seal(payload, KEY, CTX)
    assert blob.startswith(MAGIC) and payload not in blob
    assert open_sealed(blob, KEY, CTX) == payload
    update, _ = open_client_update(blob, KEY, CTX, TEMPLATE, LIMITS)
    assert update.client == "aws" and update.num_examples == 12
    for name, value in tensors.items():
        assert torch.equal(update.delta[name], value)
    assert seal(payload, KEY, CTX) != blob  # a fresh nonce every time


def test_tampered_ciphertext_and_header():
    blob = bytearray(_sealed())
    blob[-40] ^= 0x01
    assert _reason(bytes(blob)) is Reason.AUTHENTICATION_FAILED
    # Editing the header to claim another round is caught before decryption...
    forged = _sealed().replace(b'"round":3', b'"round":4')
    assert _reason(forged, EnvelopeContext("fed", 4, "aws")) is Reason.AUTHENTICATION_FAILED
    # ...and a header edit that keeps the claimed context (here the nonce) fails authentication.
    original = _sealed()
    start = original.index(b'"nonce":"') + len(b'"nonce":"')
    flipped = original[:start] + (b"0" if original[start : start + 1] != b"0" else b"1") + original[start + 1 :]
    assert _reason(flipped) is Reason.AUTHENTICATION_FAILED


def test_truncated_at_every_region():
    blob = _sealed()
    header_end = blob.index(b"}") + 1
    for cut in (0, 5, len(MAGIC) + 2, header_end - 3, header_end + 10, len(blob) - 1):
        assert _reason(blob[:cut]) is Reason.TRUNCATED, cut


def test_wrong_round_client_federation_and_key():
    blob = _sealed()
    assert _reason(blob, EnvelopeContext("fed", 4, "aws")) is Reason.WRONG_ROUND  # replay into a later round
    assert _reason(blob, EnvelopeContext("fed", 3, "gcp")) is Reason.WRONG_CLIENT  # moved to another client's slot
    assert _reason(blob, EnvelopeContext("other", 3, "aws")) is Reason.WRONG_FEDERATION
    assert _reason(blob, key=UpdateKey(bytes(32), "gcp-key-id")) is Reason.WRONG_KEY  # sealed for another key
    assert _reason(blob, key=UpdateKey(bytes(32), KEY.kid)) is Reason.AUTHENTICATION_FAILED  # a forged key id


def test_bad_contents_after_authentication():
    assert _reason(seal(b"not safetensors at all", KEY, CTX)) is Reason.MALFORMED
    assert _reason(_sealed({"other": torch.zeros(2)})) is Reason.UNEXPECTED_TENSORS
    wrong_shape = {**_update(), "layer.lora_A.weight": torch.zeros(4, 8)}
    assert _reason(_sealed(wrong_shape)) is Reason.SHAPE_MISMATCH
    wrong_dtype = {**_update(), "layer.lora_B.weight": torch.zeros(16, 4, dtype=torch.float16)}
    assert _reason(_sealed(wrong_dtype)) is Reason.DTYPE_MISMATCH
    nan = _update()
    nan["layer.lora_B.weight"][3, 1] = float("nan")
    assert _reason(_sealed(nan)) is Reason.NON_FINITE
    inf = _update()
    inf["layer.lora_A.weight"][0, 0] = float("inf")
    assert _reason(_sealed(inf)) is Reason.NON_FINITE
    assert _reason(_sealed(examples="-3")) is Reason.OUT_OF_RANGE
    assert _reason(_sealed(examples="1" + "0" * 400)) is Reason.MALFORMED  # not a count at all
    assert _reason(b"GARBAGE!" + bytes(64)) is Reason.MALFORMED


def test_safetensors_parse_never_executes_code():
    with pytest.raises(UpdateRejected, match="malformed"):
        bytes_to_tensors(b"\x08\x00\x00\x00\x00\x00\x00\x00{'a': 1}")
