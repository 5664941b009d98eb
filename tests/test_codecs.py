"""Update codecs: round trips within each codec's error bound, stacking, refusal of anything
but the configured chain, named rejections for malformed encodings, error feedback, and a real
federation whose updates travel compressed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlib.codecs import CodecChain
from fedlib.config import ConfigError, load_config, parse_config
from fedlib.rejection import Reason, UpdateRejected
from fedlib.wire.serialization import bytes_to_tensors, tensors_to_bytes
from flows.federated_training import federated_training
from tests.conftest import tiny_config_dict, write_config


def _delta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "a.lora_A.weight": torch.randn(8, 300, generator=gen) * 0.01,
        "a.lora_B.weight": torch.randn(96, 8, generator=gen) * 0.01,
        "bias": torch.randn(1000, generator=gen) * 0.01,
        "empty": torch.zeros(0, 4),
    }


def _round_trip(chain: CodecChain, tensors):
    encoded, description = chain.encode(tensors)
    payload = chain.compress(tensors_to_bytes(encoded, metadata={"codecs": description}))
    decoded = chain.decode(bytes_to_tensors(chain.decompress(payload, 1 << 30)), description, tensors)
    return decoded, len(payload)


def test_no_codecs_is_the_identity():
    delta = _delta()
    decoded, size = _round_trip(CodecChain(), delta)
    assert all(torch.equal(decoded[k], delta[k]) for k in delta)
    assert size == len(tensors_to_bytes(delta, metadata={"codecs": "[]"}))


@pytest.mark.parametrize(("codec", "relative_bound", "absolute_bound"), [("fp16", 2**-11, 2**-25), ("bf16", 2**-8, 0.0)])
def test_half_precision_error_bound(codec, relative_bound, absolute_bound):
    """Half a unit in the last place; fp16 also has a fixed step of 2^-24 below 2^-14 (subnormals)."""
    delta = _delta()
    decoded, _ = _round_trip(CodecChain((codec,)), delta)
    for name, value in delta.items():
        assert decoded[name].dtype == torch.float32 and decoded[name].shape == value.shape
        assert torch.all((decoded[name] - value).abs() <= value.abs() * relative_bound + absolute_bound)


def test_int8_error_is_at_most_half_a_step_per_row():
    delta = _delta()
    decoded, size = _round_trip(CodecChain(("int8",)), delta)
    wide = delta["a.lora_A.weight"]  # 8 × 300: a scale per row
    step = wide.abs().amax(dim=1, keepdim=True) / 127
    assert torch.all((decoded["a.lora_A.weight"] - wide).abs() <= step / 2 + 1e-9)
    tall = delta["a.lora_B.weight"]  # 96 × 8: a scale per column, the longer side
    step = tall.abs().amax(dim=0, keepdim=True) / 127
    assert torch.all((decoded["a.lora_B.weight"] - tall).abs() <= step / 2 + 1e-9)
    flat = delta["bias"]  # 1-D: rows of 256
    rows = torch.cat([flat, flat.new_zeros(24)]).reshape(-1, 256)
    bound = (rows.abs().amax(dim=1, keepdim=True) / 127 / 2).expand(-1, 256).flatten()[:1000]
    assert torch.all((decoded["bias"] - flat).abs() <= bound + 1e-9)
    assert size < len(tensors_to_bytes(delta)) / 3  # headers weigh on tensors this small


def test_topk_keeps_exactly_the_largest_entries():
    delta = _delta()
    decoded, _ = _round_trip(CodecChain(("topk",), topk_fraction=0.05), delta)
    for name, value in delta.items():
        kept = torch.count_nonzero(decoded[name]).item()
        assert kept == (math.ceil(0.05 * value.numel()) if value.numel() else 0)
        nonzero = decoded[name] != 0
        assert torch.equal(decoded[name][nonzero], value[nonzero])  # kept values are exact
        if kept:
            assert value[~nonzero].abs().max() <= value[nonzero].abs().min()  # and they are the largest


def test_topk_index_tokens_carry_gaps_of_any_length():
    value = torch.zeros(200_000)
    where = torch.tensor([0, 1, 255, 510, 766, 70_000, 199_999])
    value[where] = torch.arange(1, 8, dtype=torch.float32)
    encoded, description = CodecChain(("topk",), topk_fraction=7 / 200_000).encode({"w": value})
    assert encoded["w::gaps"].dtype == torch.uint8
    assert encoded["w::gaps"].numel() < 800  # one byte per short gap, one per 255 of a long one
    decoded = CodecChain(("topk",), topk_fraction=7 / 200_000).decode(encoded, description, {"w": value})["w"]
    assert torch.equal(decoded, value)


def test_stacked_chain_is_small_and_bounded():
    delta = _delta()
    chain = CodecChain(("topk", "int8", "zstd"), topk_fraction=0.02)
    decoded, size = _round_trip(chain, delta)
    fp32 = len(tensors_to_bytes(delta))
    assert size * 20 < fp32
    for name, value in delta.items():
        nonzero = decoded[name] != 0
        if value.numel():  # kept entries within int8's half step of their row (rows of 256 values)
            assert (decoded[name][nonzero] - value[nonzero]).abs().max() <= value.abs().max() / 127


def test_error_feedback_delivers_what_compression_held_back():
    """Summed over rounds, what the aggregator decodes tracks what the client meant to send:
    with feedback the gap stays one round's residual; without it, it grows every round."""
    chain = CodecChain(("topk",), topk_fraction=0.1)
    gen = torch.Generator().manual_seed(3)
    residual = torch.zeros(2000)
    sent_total, meant_total, lossy_total = torch.zeros(2000), torch.zeros(2000), torch.zeros(2000)
    for _ in range(30):
        update = torch.randn(2000, generator=gen) * 0.01 + 0.003  # a steady drift the small entries carry
        meant_total += update
        with_feedback = update + residual
        encoded, description = chain.encode({"w": with_feedback})
        decoded = chain.decode(encoded, description, {"w": update})["w"]
        residual = with_feedback - decoded
        sent_total += decoded
        encoded, description = chain.encode({"w": update})
        lossy_total += chain.decode(encoded, description, {"w": update})["w"]
    assert torch.allclose(sent_total + residual, meant_total, atol=1e-5)  # nothing is lost, only delayed
    assert (sent_total - meant_total).norm() < 0.5 * (lossy_total - meant_total).norm()


def _encoded(chain: CodecChain):
    encoded, description = chain.encode(_delta())
    return dict(encoded), json.loads(description)


@pytest.mark.parametrize(
    ("chain", "mutate", "match"),
    [
        (CodecChain(("topk",)), lambda t, d: t["bias::gaps"].__setitem__(1, 0), "strictly increasing"),
        (
            CodecChain(("topk",)),
            lambda t, d: t.__setitem__(
                "bias::gaps", torch.cat([t["bias::gaps"][:-1], torch.full((9,), 255, dtype=torch.uint8), t["bias::gaps"][-1:]])
            ),
            "beyond 1000",
        ),
        (CodecChain(("topk",)), lambda t, d: t["bias::gaps"].__setitem__(-1, 255), "end mid-gap"),
        (CodecChain(("topk",)), lambda t, d: t.__setitem__("bias::gaps", t["bias::gaps"].to(torch.int32)), "do not fit"),
        (CodecChain(("topk",)), lambda t, d: t.pop("bias::values"), "missing tensor"),
        (CodecChain(("int8",)), lambda t, d: t.__setitem__("bias::scale", torch.ones(3)), "do not fit"),
        (CodecChain(("int8",)), lambda t, d: d[0][1]["shapes"].__setitem__("bias", [2000]), "do not fit"),
        (CodecChain(("int8",)), lambda t, d: d[0][1]["shapes"].__setitem__("bias", "x"), "expected list"),
        (CodecChain(("fp16",)), lambda t, d: t.__setitem__("bias", t["bias"].float()), "expected a torch.float16"),
    ],
)
def test_malformed_encodings_are_named_rejections(chain, mutate, match):
    tensors, description = _encoded(chain)
    mutate(tensors, description)
    with pytest.raises(UpdateRejected, match=match) as info:
        chain.decode(tensors, json.dumps(description), _delta())
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize("chain", [CodecChain(("int8",)), CodecChain(("topk",))])
def test_declared_shapes_past_the_template_are_refused_before_allocation(chain):
    tensors, description = _encoded(chain)
    description[0][1]["shapes"]["bias"] = [1 << 27]  # 512 MiB of float32 for a 1000-entry tensor
    with pytest.raises(UpdateRejected, match="declares 134217728 entries") as info:
        chain.decode(tensors, json.dumps(description), _delta())
    assert info.value.reason is Reason.SHAPE_MISMATCH


def test_only_the_configured_chain_is_accepted_and_zstd_cannot_bomb():
    encoded, description = CodecChain(("fp16",)).encode(_delta())
    with pytest.raises(UpdateRejected, match=r"encoded with \['fp16'\], this federation uses \['int8'\]"):
        CodecChain(("int8",)).decode(encoded, description, _delta())
    bomb = CodecChain(("zstd",)).compress(b"\0" * 10_000_000)
    assert len(bomb) < 10_000
    with pytest.raises(UpdateRejected) as info:
        CodecChain(("zstd",)).decompress(bomb, max_bytes=1_000_000)
    assert info.value.reason is Reason.TOO_LARGE
    with pytest.raises(UpdateRejected, match="zstd"):
        CodecChain(("zstd",)).decompress(b"not zstd at all", 1000)


def test_chain_rules_are_config_errors(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["compression"] = {"codecs": ["zstd", "topk"]}
    with pytest.raises(ConfigError, match="fed.yaml: compression: zstd compresses bytes"):
        parse_config(raw, "fed.yaml")
    raw["compression"] = {"codecs": ["int8"]}
    raw["secure_aggregation"] = {"enabled": True}
    with pytest.raises(ConfigError, match="compression.codecs: masked updates are uniform noise"):
        parse_config(raw, "fed.yaml")


def test_a_federation_with_compressed_updates_and_error_feedback(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws", "gcp"))
    raw["compression"] = {"codecs": ["topk", "int8", "zstd"], "topk_fraction": 0.05}
    path = write_config(tmp_path, raw)
    manifests = federated_training(str(path))
    config = load_config(path)
    plain = [c.bytes_uploaded for m in manifests[1:] for c in m.clients.values()]
    adapter_bytes = manifests[1].clients["aws"].bytes_downloaded
    assert adapter_bytes > 0 and all(b * 10 < adapter_bytes for b in plain)  # ≥10× smaller than the fp32 adapter
    assert manifests[-1].round == 2 and len(manifests[-1].accepted) == 2
    # Each client's residual sits in its own bucket, sealed: no safetensors header in the clear.
    from fedlib.wire import storage
    from tasks.from_config import checkpoint_store, keyring, residual_store

    for client in ("aws", "gcp"):
        store = residual_store(config, keyring(config), client, None)
        blob = storage.read_limited(store.url, 1 << 30)
        assert b'"dtype"' not in blob and config.storage_url(config.cloud(client)) in store.url
        assert checkpoint_store(config).last_accepted_round(client, 3) == 2
        residual = store.load(2)  # opens for its owner: what top-k held back, per tensor
        assert set(residual) == set(checkpoint_store(config).adapter(2))
        assert sum(float(t.abs().sum()) for t in residual.values()) > 0
        assert store.load(1) == {}  # written in round 2: never added back as round 1's


@pytest.mark.parametrize(("codec", "bits"), [("int4", 4), ("int2", 2)])
def test_low_bit_codecs_are_bounded_unbiased_and_small(codec, bits):
    """Each entry lands on one of the two grid points around it (a step is 2s/(2^bits − 1) of its
    block's largest magnitude s); rounding is stochastic, so the mean of many encodings is the
    input; the payload is bits/8 bytes per entry plus a bf16 scale per 64."""
    delta = _delta()
    chain = CodecChain((codec,))
    encoded, description = chain.encode(delta, torch.Generator().manual_seed(1))
    decoded = chain.decode(encoded, description, delta)
    for name, value in delta.items():
        assert decoded[name].shape == value.shape and decoded[name].dtype == torch.float32
        if not value.numel():
            continue
        flat = value.flatten()
        blocks = torch.cat([flat, flat.new_zeros((-flat.numel()) % 64)]).reshape(-1, 64)
        s = blocks.abs().amax(dim=1, keepdim=True).expand(-1, 64).flatten()[: flat.numel()]
        step = 2 * s / (2**bits - 1)
        assert torch.all((decoded[name].flatten() - flat).abs() <= step + 0.01 * s)  # + the bf16 scale's rounding
        assert encoded[f"{name}::codes"].numel() == math.ceil(flat.numel() / 64) * 64 * bits // 8
    draws = 300
    mean = sum(chain.decode(*chain.encode(delta, torch.Generator().manual_seed(i)), delta)["a.lora_A.weight"] for i in range(draws)) / draws
    single = (decoded["a.lora_A.weight"] - delta["a.lora_A.weight"]).abs().mean()
    assert (mean - delta["a.lora_A.weight"]).abs().mean() < single / 8  # √300 ≈ 17 for an unbiased code
    data_bytes = sum(v.numel() * v.element_size() for v in encoded.values())
    blocks = sum(math.ceil(v.numel() / 64) for v in delta.values())
    assert data_bytes == blocks * 64 * bits // 8 + 2 * blocks  # codes and bf16 scales, nothing else
    assert data_bytes < sum(4 * v.numel() for v in delta.values()) * (bits + 0.6) / 32


def test_scaled_sign_is_a_deterministic_contraction_at_one_bit_and_a_scale_per_row():
    """Each row (a LoRA factor's rank component: A's rows, B's columns; runs of 256 of a 1-D
    tensor) decodes to sign(x) × its mean |x|: the same every time (no rounding draw), no farther
    from the input than zero is (what error feedback needs to converge), and, for the
    near-constant magnitudes of Adam's steps, close."""
    delta = _delta()
    chain = CodecChain(("sign",))
    encoded, description = chain.encode(delta, torch.Generator().manual_seed(1))
    again, _ = chain.encode(delta, torch.Generator().manual_seed(2))
    assert all(torch.equal(encoded[k], again[k]) for k in encoded)
    decoded = chain.decode(encoded, description, delta)
    rows = {"a.lora_A.weight": delta["a.lora_A.weight"], "a.lora_B.weight": delta["a.lora_B.weight"].T}
    for name, value in rows.items():
        got = decoded[name] if value is delta[name] else decoded[name].T
        assert torch.all((got - value).norm(dim=1) <= value.norm(dim=1) * 1.001)  # a contraction, row by row
        assert torch.allclose(got.abs(), value.abs().mean(dim=1, keepdim=True).expand_as(value), rtol=0.01)
        assert torch.equal(torch.sign(got), torch.where(value >= 0, 1.0, -1.0))
        assert encoded[f"{name}::codes"].numel() == value.numel() // 8 and encoded[f"{name}::scale"].numel() == value.shape[0]
    bias = decoded["bias"]  # 1000 entries: three runs of 256 and one of 232, whose mean is over its own entries
    assert math.isclose(float(bias[-1].abs()), float(delta["bias"][768:].abs().mean()), rel_tol=0.01)
    steps = torch.sign(torch.randn(8, 576)) * (1e-3 + 1e-4 * torch.rand(8, 576))  # Adam-like: lr·sign(g)
    close = chain.decode(*chain.encode({"a": steps}), {"a": steps})["a"]
    assert (close - steps).norm() < 0.05 * steps.norm()


def test_projected_sign_delivers_the_whole_row_along_itself_and_stays_a_contraction():
    """`sign-proj` scales a row's signs by Σx²/Σ|x|, so the decoded row's projection onto the input
    is the input (where `sign` delivers only κ = (Σ|x|)²/(n·Σx²) of it, 2/π for a Gaussian row);
    on a row whose mass sits in a few entries that scale would overshoot, and the cap at 1.75 ×
    the mean |x| keeps the decoded row closer to the input than zero is."""
    gen = torch.Generator().manual_seed(4)
    gaussian = torch.randn(8, 576, generator=gen) * 1e-3
    chain, plain = CodecChain(("sign-proj",)), CodecChain(("sign",))
    got = chain.decode(*chain.encode({"a": gaussian}), {"a": gaussian})["a"]
    along = (got * gaussian).sum(dim=1) / gaussian.square().sum(dim=1)
    assert torch.allclose(along, torch.ones(8), atol=0.01)
    mean_scaled = plain.decode(*plain.encode({"a": gaussian}), {"a": gaussian})["a"]
    kappa = gaussian.abs().sum(dim=1).square() / (576 * gaussian.square().sum(dim=1))
    assert torch.allclose((mean_scaled * gaussian).sum(dim=1) / gaussian.square().sum(dim=1), kappa, atol=0.01)
    assert torch.all((got - gaussian).norm(dim=1) < gaussian.norm(dim=1))
    spiky = torch.full((2, 576), 1e-5)
    spiky[:, :4] = 1e-2  # κ ≈ 0.009: uncapped, the decoded row would be 10 times as far from it as zero is
    capped = chain.decode(*chain.encode({"a": spiky}), {"a": spiky})["a"]
    assert torch.allclose(capped.abs(), 1.75 * spiky.abs().mean(dim=1, keepdim=True).expand_as(spiky), rtol=0.01)
    assert torch.all((capped - spiky).norm(dim=1) < spiky.norm(dim=1))


@pytest.mark.parametrize("codec", ["int4", "int2", "sign", "sign-proj"])
def test_malformed_low_bit_encodings_are_named_rejections(codec):
    delta = _delta()
    chain = CodecChain((codec,))
    encoded, description = chain.encode(delta)
    name = "a.lora_A.weight"

    def rejected(tensors, desc=description) -> UpdateRejected:
        with pytest.raises(UpdateRejected) as caught:
            chain.decode(tensors, desc, delta)
        return caught.value

    assert rejected({**encoded, f"{name}::codes": encoded[f"{name}::codes"][:-1]}).reason == Reason.MALFORMED
    assert rejected({**encoded, f"{name}::scale": encoded[f"{name}::scale"].float()}).reason == Reason.MALFORMED
    bad_scale = encoded[f"{name}::scale"].clone()
    bad_scale[0] = float("inf")
    assert rejected({**encoded, f"{name}::scale": bad_scale}).reason == Reason.MALFORMED
    huge = json.loads(description)
    huge[0][1]["shapes"][name] = [2**20, 2**20]  # declared before anything of that size exists
    assert rejected(encoded, json.dumps(huge)).reason == Reason.SHAPE_MISMATCH
    missing = {k: v for k, v in encoded.items() if k != f"{name}::scale"}
    assert rejected(missing).reason == Reason.MALFORMED


def test_one_quantiser_and_no_half_cast_of_low_bit_scales():
    with pytest.raises(ValueError, match="one quantiser at most"):
        CodecChain(("int8", "int2"))
    for after in ("fp16", "topk"):
        with pytest.raises(ValueError, match="must be the last tensor codec"):
            CodecChain(("int4", after))
    CodecChain(("topk", "int2", "zstd"))  # top-k's values, then quantised: allowed
