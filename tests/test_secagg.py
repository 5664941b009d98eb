"""Secure aggregation's pieces, and the protocol run on them: the sum equals FedAvg, each masked
upload looks uniform, and a client that drops after masking is recovered from Shamir shares."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy.stats import chi2

from fedlib.secagg.fixedpoint import MODULUS, decode, encode
from fedlib.secagg.masking import apply_masks, masked_sum, remove_dropped_masks
from fedlib.secagg.shamir import combine_shares, split_secret
from fedlib.strategies import ClientUpdate, make_strategy

FRAC = 16
CONTEXT = b"fed/round-3"
CLIENTS = ["aws", "azure", "gcp", "onprem"]


def test_fixed_point_round_trip_and_overflow():
    values = {"w": torch.tensor([0.0, 1.5, -2.25, 1e-3, -1e-3, 30000.0])}
    encoded = encode(values, FRAC)
    assert int(encoded["w"].min()) >= 0 and int(encoded["w"].max()) < MODULUS
    torch.testing.assert_close(decode(encoded, FRAC)["w"], values["w"].double(), atol=2**-FRAC, rtol=0)
    with pytest.raises(OverflowError, match="big: "):
        encode({"big": torch.tensor([40000.0])}, FRAC)


def test_shamir_any_threshold_subset_rebuilds_the_secret():
    secret = bytes(range(32))
    shares = split_secret(secret, n=5, threshold=3)
    for subset in itertools.combinations(shares, 3):
        assert combine_shares(list(subset)) == secret
    assert combine_shares(shares[:2]) != secret  # below threshold: a meaningless value
    assert split_secret(secret, 5, 3) != shares  # fresh randomness each time
    with pytest.raises(ValueError, match="duplicate"):
        combine_shares([shares[0], shares[0], shares[1]])
    with pytest.raises(ValueError, match="threshold"):
        split_secret(secret, 3, 4)


def _round(seed: int = 0):
    """Four clients' deltas, example counts, and per-round mask key pairs."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {c: {"a": torch.randn(64, 8, generator=gen) * 0.01, "b": torch.randn(8, 32, generator=gen) * 0.01} for c in CLIENTS}
    examples = {c: n for c, n in zip(CLIENTS, (120, 45, 300, 7))}
    mask_keys = {c: X25519PrivateKey.generate() for c in CLIENTS}
    publics = {c: k.public_key() for c, k in mask_keys.items()}
    masked = {
        c: apply_masks(encode({k: v * examples[c] for k, v in deltas[c].items()}, FRAC), c, mask_keys[c], publics, CONTEXT)
        for c in CLIENTS
    }
    return deltas, examples, mask_keys, publics, masked


def _fedavg(deltas, examples, clients):
    glob = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in deltas[clients[0]].items()}
    updates = [ClientUpdate(c, examples[c], {k: v.double() for k, v in deltas[c].items()}) for c in clients]
    return make_strategy("fedavg").aggregate(1, glob, updates)


def test_masked_sum_equals_fedavg():
    deltas, examples, _, _, masked = _round()
    total = decode(masked_sum(masked.values()), FRAC)
    mean = {k: v / sum(examples.values()) for k, v in total.items()}
    expected = _fedavg(deltas, examples, CLIENTS)
    for name in mean:  # tolerance: n clients' rounding of 2^-17 each, over Σ examples
        torch.testing.assert_close(mean[name], expected[name], atol=len(CLIENTS) * 2**-FRAC / sum(examples.values()), rtol=0)


def _uniformity_p_value(residues: torch.Tensor, bins: int = 64) -> float:
    counts = np.bincount((residues.flatten().numpy() >> 26).astype(np.int64), minlength=bins)  # top 6 bits
    expected = residues.numel() / bins
    return float(chi2.sf(((counts - expected) ** 2 / expected).sum(), df=bins - 1))


def test_each_masked_upload_is_indistinguishable_from_uniform():
    deltas, examples, _, _, masked = _round(seed=1)
    for client in CLIENTS:
        flat = torch.cat([v.flatten() for v in masked[client].values()])
        # Mask keys are fresh each run, so p is uniform under H0: 1e-6 keeps chance failures
        # negligible while the unmasked encoding below sits at p < 1e-12.
        assert _uniformity_p_value(flat) > 1e-6, client
        plain = torch.cat([v.flatten() for v in encode(deltas[client], FRAC).values()])
        assert _uniformity_p_value(plain) < 1e-12  # the unmasked encoding is plainly not uniform


def test_sum_is_recovered_when_a_client_drops_after_masking():
    deltas, examples, mask_keys, publics, masked = _round(seed=2)
    dropped, survivors = "gcp", [c for c in CLIENTS if c != "gcp"]
    # gcp shared its mask key 3-of-4 before masking; its masked update never arrives.
    raw = mask_keys[dropped].private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    shares = dict(zip(CLIENTS, split_secret(raw, n=len(CLIENTS), threshold=3)))
    partial = masked_sum(masked[c] for c in survivors)
    leftover = decode(partial, FRAC)["a"] / sum(examples[c] for c in survivors)
    assert not torch.allclose(leftover, _fedavg(deltas, examples, survivors)["a"], atol=1e-3)  # masks remain

    rebuilt = X25519PrivateKey.from_private_bytes(combine_shares([shares[c] for c in survivors[:3]]))
    clean = remove_dropped_masks(partial, dropped, rebuilt, {c: publics[c] for c in survivors}, CONTEXT)
    mean = {k: v / sum(examples[c] for c in survivors) for k, v in decode(clean, FRAC).items()}
    expected = _fedavg(deltas, examples, survivors)
    for name in mean:
        torch.testing.assert_close(mean[name], expected[name], atol=1e-6, rtol=0)


def test_protocol_messages_end_to_end_with_a_dropout(tmp_path):
    """Setup messages sealed per client pair, masking with authenticated peer keys, a client that
    drops after masking, survivors' reveals sealed for the aggregator, the FedAvg of survivors."""
    from fedlib.envelope import EnvelopeContext
    from fedlib.federation import aggregator_update_key, client_update_key
    from fedlib.keys import init_keys, load_keyring
    from fedlib.rejection import UpdateRejected
    from fedlib.secagg.protocol import make_reveal, make_setup, open_setup, rebuild_mask_key

    init_keys(tmp_path, CLIENTS)
    ring = load_keyring(tmp_path, CLIENTS)
    fed, rnd, threshold = "fed", 3, 3
    context = f"{fed}/round-{rnd}".encode()
    setups = {c: make_setup(ring, c, CLIENTS, threshold, fed, rnd) for c in CLIENTS}
    board = {(sender, recipient): blob for sender, s in setups.items() for recipient, blob in s.messages.items()}
    assert len(board) == len(CLIENTS) * (len(CLIENTS) - 1)

    received = {
        me: {sender: open_setup(ring, me, sender, board[(sender, me)], fed, rnd) for sender in CLIENTS if sender != me}
        for me in CLIENTS
    }
    deltas, examples, _, _, _ = _round(seed=4)
    masked = {}
    for me in CLIENTS:
        publics = {sender: public for sender, (public, _) in received[me].items()}
        weighted = encode({k: v * examples[me] for k, v in deltas[me].items()}, FRAC)
        masked[me] = apply_masks(weighted, me, setups[me].mask_private, publics, context)

    dropped, survivors = "azure", [c for c in CLIENTS if c != "azure"]
    reveals = {
        s: make_reveal(ring, s, dropped, received[s][dropped][1], fed, rnd, client_update_key(ring, s)) for s in survivors
    }
    keys = {s: aggregator_update_key(ring, s) for s in survivors}
    rebuilt = rebuild_mask_key(reveals, dropped, keys, threshold, fed, rnd)
    survivor_publics = {s: setups[s].mask_private.public_key() for s in survivors}
    clean = remove_dropped_masks(masked_sum(masked[s] for s in survivors), dropped, rebuilt, survivor_publics, context)
    mean = {k: v / sum(examples[s] for s in survivors) for k, v in decode(clean, FRAC).items()}
    expected = _fedavg(deltas, examples, survivors)
    for name in mean:
        torch.testing.assert_close(mean[name], expected[name], atol=1e-6, rtol=0)

    # The relay (or a storage provider) cannot swap a mask public key or read a share.
    forged = bytearray(board[("gcp", "aws")])
    forged[-20] ^= 1
    with pytest.raises(UpdateRejected, match="authentication_failed"):
        open_setup(ring, "aws", "gcp", bytes(forged), fed, rnd)
    with pytest.raises(UpdateRejected, match="wrong_client"):  # gcp's message to onprem replayed to aws
        open_setup(ring, "aws", "gcp", board[("gcp", "onprem")], fed, rnd)
    with pytest.raises(ValueError, match="threshold is 3"):
        rebuild_mask_key({s: reveals[s] for s in survivors[:2]}, dropped, keys, threshold, fed, rnd)
