"""One contract for every registered codec (`fedlib.codecs.codecs`), so a codec added to the
registry is held to it without a test of its own: the round trip keeps names, shapes and dtypes
and stays within the codec's declared error bound; the encoded parts cost no more than declared;
and any encoded part that is missing, cut short, widened or of another dtype, any step that
declares a shape past the template, and any stray tensor, is a named rejection."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlib.codecs import CodecChain, codecs, tensor_codec
from fedlib.codecs.base import CodecOptions
from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.serialization import tensors_to_bytes

NAMES = sorted(codecs.items)


def _update(seed: int = 0) -> dict[str, torch.Tensor]:
    """LoRA's shapes, a 1-D tensor that is no whole number of blocks, an empty one, and an
    integer tensor that every codec must pass through untouched."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "q.lora_A.weight": torch.randn(8, 576, generator=gen) * 1e-3,
        "q.lora_B.weight": torch.randn(192, 8, generator=gen) * 1e-3,
        "bias": torch.randn(1000, generator=gen) * 1e-3,
        "empty": torch.zeros(0, 4),
        "count": torch.arange(5, dtype=torch.int64),
    }


def _chain(name: str) -> CodecChain:
    return CodecChain((name,), topk_fraction=0.1)


def test_every_codec_is_registered_with_what_a_chain_needs():
    assert set(NAMES) == {"fp16", "bf16", "int8", "int4", "int2", "sign", "sign-proj", "topk"}
    for name in NAMES:
        codec = tensor_codec(name, CodecOptions(topk_fraction=0.1))
        assert codec.name == name and codec.role in ("cast", "quantiser", "sparsifier")
        assert codec.meta_field in ("cast", "shapes")
    with pytest.raises(ValueError, match="unknown codec 'lz4'"):
        CodecChain(("lz4",))


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_within_the_declared_bound(name):
    update = _update()
    chain = _chain(name)
    codec = chain.codecs[0]
    encoded, description = chain.encode(update, torch.Generator().manual_seed(3))
    decoded = chain.decode(encoded, description, update)
    assert set(decoded) == set(update)
    assert torch.equal(decoded["count"], update["count"])
    for key, value in update.items():
        if not value.is_floating_point():
            continue
        assert decoded[key].shape == value.shape and decoded[key].dtype == torch.float32
        error = (decoded[key] - value).abs()
        assert torch.all(error <= codec.error_bound(value)), (
            f"{name}: {key} off by {float((error - codec.error_bound(value)).max()):.3g} past its bound"
        )
    payload = tensors_to_bytes(encoded, metadata={"codecs": description})
    assert len(payload) < sum(v.numel() * v.element_size() for v in update.values()) + 4096


@pytest.mark.parametrize("name", NAMES)
def test_encoded_parts_cost_no_more_than_declared(name):
    update = _update()
    chain = _chain(name)
    encoded, _ = chain.encode(update)
    for key, value in update.items():
        if not value.is_floating_point():
            continue
        parts = [v for k, v in encoded.items() if k == key or k.startswith(f"{key}::")]
        spent = sum(p.numel() * p.element_size() for p in parts)
        assert parts and spent <= chain.codecs[0].cost(tuple(value.shape))
        if value.numel() and name != "topk":  # the dense codecs spend exactly what they declare
            assert spent == chain.codecs[0].cost(tuple(value.shape))


def _rejected(chain: CodecChain, tensors, description: str, template) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as caught:
        chain.decode(tensors, description, template)
    return caught.value


@pytest.mark.parametrize("name", NAMES)
def test_every_malformed_part_is_a_named_rejection(name):
    update = _update()
    chain = _chain(name)
    encoded, description = chain.encode(update)
    float_parts = [k for k in encoded if k != "count" and encoded[k].numel()]
    for part in float_parts:
        value = encoded[part]
        mutations = {
            "missing": {k: v for k, v in encoded.items() if k != part},
            "cut short": {**encoded, part: value.flatten()[:-1]},
            "widened": {**encoded, part: torch.cat([value.flatten(), value.flatten()[:1]])},
            "another dtype": {**encoded, part: value.to(torch.float64 if value.dtype != torch.float64 else torch.float32)},
        }
        for what, tensors in mutations.items():
            if what == "cut short" and name == "topk" and part.endswith("::gaps"):
                continue  # one gap fewer is still a valid index list; the values then do not fit (next line)
            reason = _rejected(chain, tensors, description, update).reason
            assert reason in (Reason.MALFORMED, Reason.SHAPE_MISMATCH), f"{name}: {part} {what}: {reason}"
    steps = json.loads(description)
    field = steps[0][1]
    if "shapes" in field:
        huge = json.loads(description)
        huge[0][1]["shapes"]["q.lora_A.weight"] = [2**20, 2**20]  # refused before anything of that size exists
        assert _rejected(chain, encoded, json.dumps(huge), update).reason == Reason.SHAPE_MISMATCH
        stray = json.loads(description)
        stray[0][1]["shapes"]["not.in.the.template"] = [4]
        assert _rejected(chain, encoded, json.dumps(stray), update).reason in (Reason.UNEXPECTED_TENSORS, Reason.MALFORMED)
    for broken in ("[[", "{}", json.dumps([[name, {"other": 1}]]), json.dumps([["zstd", {}]])):
        assert _rejected(chain, encoded, broken, update).reason == Reason.MALFORMED


@pytest.mark.parametrize("name", NAMES)
def test_a_chain_other_than_the_configured_one_is_refused(name):
    update = _update()
    encoded, description = _chain(name).encode(update)
    other = next(n for n in NAMES if n != name)
    reason = _rejected(_chain(other), encoded, description, update).reason
    assert reason == Reason.MALFORMED
    assert math.isfinite(float(sum(v.float().sum() for v in _chain(name).decode(encoded, description, update).values())))
