"""Tens of thousands of hostile objects through the aggregator's decode path, for every codec
chain: keyless edits of the envelope (random bytes, truncations, flips, header rewrites, nested
JSON), and payloads sealed with the client's real key (a buggy or hostile client: broken or
nested safetensors headers, lying dtypes, shapes and offsets, bad counts, codec descriptions of
the wrong types, nested, or declaring shapes up to 2^62 entries). Every object is either a
well-formed update or an `UpdateRejected` with a name; nothing else escapes. The run happens
in a fresh process, whose peak memory is measured against the byte limit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import resource
import struct
import subprocess
import sys
from pathlib import Path

import torch

from fedlib.codecs import TENSOR_CODECS, CodecChain
from fedlib.rejection import UpdateRejected
from fedlib.update.chain import Expected, open_client_update
from fedlib.wire.envelope import MAGIC, EnvelopeContext, UpdateKey, seal
from fedlib.wire.serialization import tensors_to_bytes

KEY = UpdateKey(bytes(range(32)), "aws-key-id")
CTX = EnvelopeContext("fed", 2, "aws", "", "ab" * 32)
LIMITS = Expected(max_examples=1000, max_local_steps=10)
MAX_BYTES = 16 << 20
TEMPLATE = {"a.lora_A.weight": torch.zeros(4, 32), "a.lora_B.weight": torch.zeros(32, 4), "b.bias": torch.zeros(40)}
SCALE = 5  # each mutation family's count is multiplied by this: 46 chains × 165 × 5 cases
ROOT = Path(__file__).resolve().parents[1]


def chains() -> list[CodecChain]:
    """Every valid chain: each ordering of each subset of the tensor codecs that `CodecChain`
    accepts, with or without zstd."""
    out = []
    for size in range(len(TENSOR_CODECS) + 1):
        for names in itertools.permutations(TENSOR_CODECS, size):
            for tail in ((), ("zstd",)):
                try:
                    out.append(CodecChain((*names, *tail), topk_fraction=0.25))
                except ValueError:
                    continue  # an order the config refuses too
    return out


def _update(rng: random.Random) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    return {name: torch.randn(value.shape, generator=gen) * 0.01 for name, value in TEMPLATE.items()}


def _payload(tensors, meta: dict[str, str]) -> bytes:
    return tensors_to_bytes(tensors, metadata=meta)


def _with_header(payload: bytes, header: bytes) -> bytes:
    (size,) = struct.unpack_from("<Q", payload, 0)
    return struct.pack("<Q", len(header)) + header + payload[8 + size :]


def _nested(rng: random.Random) -> str:
    depth = rng.choice([20, 200, 5000, 100_000])
    opener = rng.choice(["[", '{"a":'])
    closer = "]" if opener == "[" else "}"
    return opener * depth + "1" + closer * depth


def _lying_shape(rng: random.Random) -> list:
    return rng.choice(
        [
            [1 << rng.randrange(20, 63)],
            [1 << 27],
            [1 << 40],
            [2**31, 2**31],
            [-1],
            [3.5],
            ["4"],
            [True],
            [1] * 20,
            [],
            [0],
            [1 << 62, 4],
            [4, 32, 1 << 30],
        ]
    )


def _header_edits(rng: random.Random, payload: bytes) -> bytes:
    """A sealed payload whose safetensors header lies: every field, and its framing."""
    (size,) = struct.unpack_from("<Q", payload, 0)
    header = json.loads(payload[8 : 8 + size])
    names = [n for n in header if n != "__metadata__"]
    kind = rng.randrange(9)
    if kind == 0:
        return _with_header(payload, _nested(rng).encode())
    if kind == 1:
        return struct.pack("<Q", rng.choice([1 << 63, 1 << 40, size + 1, len(payload)])) + payload[8:]
    name = rng.choice(names) if names else "x"
    entry = header.setdefault(name, {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    if kind == 2:
        entry["shape"] = _lying_shape(rng)
    elif kind == 3:
        entry["dtype"] = rng.choice(["F8_E4M3", "BOOL", "I128", "", 7, None, "F64", "U8"])
    elif kind == 4:
        entry["data_offsets"] = rng.choice([[0, 1 << 62], [-8, 4], [5, 2], [0], "0-4", [0.5, 4], [1 << 64, 1 << 64]])
    elif kind == 5:
        header[name] = rng.choice([[], "x", 3, None, {"dtype": "F32"}, {**entry, "extra": 1}])
    elif kind == 6:
        header["__metadata__"] = rng.choice([[], {"num_examples": 3}, {"a": {"b": "c"}}, "meta"])
    elif kind == 7:
        header[f"extra{rng.randrange(9)}"] = {"dtype": "F32", "shape": _lying_shape(rng), "data_offsets": [0, 4]}
    else:
        return _with_header(payload, json.dumps(header).encode()[: rng.randrange(1, max(2, size))])
    return _with_header(payload, json.dumps(header).encode())


def _description_edits(rng: random.Random, chain: CodecChain, tensors, description: str) -> str:
    steps = json.loads(description)
    kind = rng.randrange(8)
    if kind == 0 or not steps:
        return rng.choice([_nested(rng), "", "null", "{}", "[[]]", '[["int8"]]', '[["zstd", {}]]', "[1, 2]", '"x"'])
    step = rng.choice(steps)
    meta = step[1]
    if kind == 1:
        step[1] = rng.choice([[], None, "cast", {"cast": 3}, {"shapes": []}, {"cast": [], "shapes": {}}, {"shapes": {"a": "b"}}])
    elif kind == 2 and "shapes" in meta and meta["shapes"]:
        meta["shapes"][rng.choice(list(meta["shapes"]))] = _lying_shape(rng)
    elif kind == 3 and "shapes" in meta:
        meta["shapes"][rng.choice(["zz", "a.lora_A.weight::values", "b.bias", ""])] = _lying_shape(rng)
    elif kind == 4 and "cast" in meta:
        meta["cast"] = rng.choice([[1], ["nope"], {"nope": [3]}, {n: [10**9] for n in TEMPLATE}, {n: "x" for n in TEMPLATE}, "a"])
    elif kind == 5:
        step[0] = rng.choice(["int9", "", None, 4, "zstd", "topk", "fp16"])
    elif kind == 6:
        steps.append(rng.choice([["int8", {"shapes": {}}], ["fp16", {"cast": []}], "x"]))
    else:
        steps.reverse()
    return json.dumps(steps)


JUNK: tuple = ({}, [], 0, -1, 2.5, 10**30, None, True, "", "x", [{}, {}], {"a": []}, [[]], {"": None})


def _slots(value, path=()):
    """Every position in a decoded JSON value, the value itself first: where a type can lie."""
    yield path
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _slots(item, (*path, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            yield from _slots(item, (*path, k))


def _replaced(value, path, junk):
    if not path:
        return junk
    head, *rest = path
    copy = list(value) if isinstance(value, list) else dict(value)
    copy[head] = _replaced(value[head], tuple(rest), junk)
    return copy


def _type_confused(description: str):
    """The codec description with each slot (the list, each step, each name, each field, each
    shape and each of its numbers) replaced in turn by a dict, list, number, null, bool or string;
    and a list of steps that are not [name, description] pairs, such as `[[{}, {}]]`."""
    steps = json.loads(description)
    for path in _slots(steps):
        for junk in JUNK:
            yield json.dumps(_replaced(steps, path, junk))
    for junk in JUNK:
        yield json.dumps([[junk, junk]])
        yield json.dumps([[junk, {}], *steps])


def _mutations(rng: random.Random, chain: CodecChain):
    """About 165 × SCALE hostile objects for one chain, and one valid one first."""
    tensors, description = chain.encode(_update(rng))
    meta = {"num_examples": "7", "local_steps": "3", "codecs": description}
    payload = _payload(tensors, meta)
    valid = bytes(seal(chain.compress(payload), KEY, CTX))
    yield "valid", valid
    header_end = len(MAGIC) + 4 + struct.unpack_from(">I", valid, len(MAGIC))[0]

    def sealed(raw: bytes) -> bytes:
        return bytes(seal(chain.compress(raw), KEY, CTX))

    for _ in range(12 * SCALE):  # keyless: random bytes, some behind a valid magic
        blob = rng.randbytes(rng.randrange(0, 300))
        yield "keyless", blob if rng.random() < 0.5 else MAGIC + blob
    for _ in range(12 * SCALE):  # keyless: truncations anywhere
        yield "keyless", valid[: rng.randrange(0, len(valid))]
    for _ in range(16 * SCALE):  # keyless: 1-4 flipped bytes anywhere, header included
        blob = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
        yield "keyless", bytes(blob)
    for _ in range(14 * SCALE):  # keyless: header rewrites that stay JSON, or become nested JSON
        header = json.loads(valid[len(MAGIC) + 4 : header_end])
        field = rng.choice(list(header))
        header[field] = rng.choice([-1, "2", 1e9, 10**30, None, [], {"a": 1}, True, "", "zz" * 3000])
        raw = _nested(rng).encode()[:4096] if rng.random() < 0.3 else json.dumps(header).encode()
        yield "keyless", MAGIC + struct.pack(">I", len(raw)) + raw + valid[header_end:]
    for _ in range(40 * SCALE):  # real key: the safetensors header lies
        yield "keyed", sealed(_header_edits(rng, payload))
    for _ in range(30 * SCALE):  # real key: the codec description lies
        lying = _description_edits(rng, chain, tensors, description)
        yield "keyed", sealed(_payload(tensors, {**meta, "codecs": lying}))
    for lying in _type_confused(description):  # real key: every slot of the codec description of the wrong type
        yield "typed", sealed(_payload(tensors, {**meta, "codecs": lying}))
    for _ in range(12 * SCALE):  # real key: counts that are not counts
        key = rng.choice(["num_examples", "local_steps"])
        value = rng.choice(["1" + "0" * rng.randrange(5, 500), "-3", "0", "", "3.5", "0x10", " 7", "١٢", "99999999999"])
        yield "keyed", sealed(_payload(tensors, {**meta, key: value}))
    for _ in range(12 * SCALE):  # real key: tensors renamed, dropped, added, retyped
        edited = dict(tensors)
        name = rng.choice(list(edited))
        kind = rng.randrange(4)
        if kind == 0:
            edited[name + "x"] = edited.pop(name)
        elif kind == 1:
            edited.pop(name)
        elif kind == 2:
            edited[rng.choice(["zz", name + "::q", "b.bias::values"])] = torch.zeros(rng.choice([1, 300, 5000]))
        else:
            edited[name] = edited[name].to(rng.choice([torch.float64, torch.int32, torch.uint8, torch.float16]))
        yield "keyed", sealed(_payload(edited, meta))
    for _ in range(10 * SCALE):  # real key: flipped bytes in the tensor data (may still be a valid update)
        blob = bytearray(payload)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(8, len(blob))] ^= rng.randrange(1, 256)
        yield "keyed", sealed(bytes(blob))
    for _ in range(7 * SCALE):  # real key: random or truncated plaintexts, compressed or not
        raw = rng.choice([rng.randbytes(rng.randrange(0, 400)), payload[: rng.randrange(0, len(payload))]])
        yield "keyed", bytes(seal(raw if rng.random() < 0.5 else chain.compress(raw), KEY, CTX))


def run(seed: int = 20261123) -> dict:
    """Every case through `open_client_update`; returns counts and the peak memory it took."""
    rng = random.Random(seed)
    all_chains = chains()
    cases = [(chain, kind, blob) for chain in all_chains for kind, blob in _mutations(rng, chain)]
    for chain, kind, blob in cases:  # warm up: every valid update decodes, once per chain
        if kind == "valid":
            open_client_update(blob, KEY, CTX, TEMPLATE, LIMITS, chain, MAX_BYTES)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    seen: set[bytes] = set()
    counts = {"keyless": 0, "keyed": 0, "type_confused": 0, "accepted": 0, "rejected": 0}
    reasons: dict[str, int] = {}
    escaped: list[str] = []
    for chain, kind, blob in cases:
        digest = hashlib.sha256(repr(chain.names).encode() + blob).digest()
        if kind == "valid" or digest in seen:
            continue
        seen.add(digest)
        counts["keyed" if kind == "typed" else kind] += 1
        counts["type_confused"] += kind == "typed"
        try:
            update, _ = open_client_update(blob, KEY, CTX, TEMPLATE, LIMITS, chain, MAX_BYTES)
        except UpdateRejected as err:
            counts["rejected"] += 1
            reasons[err.reason.value] = reasons.get(err.reason.value, 0) + 1
            continue
        except Exception as err:  # noqa: BLE001 - what the test is looking for
            escaped.append(f"{chain.names}: {type(err).__name__}: {str(err)[:200]}")
            continue
        counts["accepted"] += 1
        if set(update.delta) != set(TEMPLATE) or not all(torch.isfinite(v).all() for v in update.delta.values()):
            escaped.append(f"{chain.names}: an accepted update that does not fit the template")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "chains": len(all_chains),
        "distinct": len(seen),
        **counts,
        "reasons": reasons,
        "escaped": escaped,
        "peak_over_baseline": peak - baseline,
    }


def test_every_hostile_object_is_a_named_rejection_within_bounded_memory():
    """In its own process, so that the peak resident memory measured is the decode path's."""
    code = "import json; from tests.test_fuzz_envelopes import run; print(json.dumps(run()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({k: v for k, v in result.items() if k != "escaped"}))
    assert result["escaped"] == [], result["escaped"][:10]
    assert result["chains"] == len(chains()) == 46 and result["distinct"] >= 20_000 and result["type_confused"] >= 5_000
    assert result["keyless"] >= 5_000 and result["keyed"] >= 10_000
    assert {"malformed", "truncated", "authentication_failed", "out_of_range", "unexpected_tensors"} <= result["reasons"].keys()
    assert result["peak_over_baseline"] < 4 * MAX_BYTES, result["peak_over_baseline"]
