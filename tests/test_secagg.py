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
from fedlib.secagg.masking import add_masked, apply_masks, remove_dropped_masks
from fedlib.secagg.shamir import combine_shares, split_secret
from fedlib.strategies import ClientUpdate, make_strategy

FRAC = 16
CONTEXT = b"fed/round-3"
CLIENTS = ["aws", "azure", "gcp", "onprem"]


def masked_sum(updates) -> dict[str, torch.Tensor]:
    """The ring sum of masked updates, as the aggregator streams it (`add_masked`)."""
    updates = list(updates)
    total = {name: torch.zeros(value.shape, dtype=torch.int64) for name, value in updates[0].items()}
    for update in updates:
        add_masked(total, update)
    return total


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
    examples = {c: n for c, n in zip(CLIENTS, (120, 45, 300, 7), strict=True)}
    mask_keys = {c: X25519PrivateKey.generate() for c in CLIENTS}
    publics = {c: k.public_key() for c, k in mask_keys.items()}
    masked = {
        c: apply_masks(encode({k: v * examples[c] for k, v in deltas[c].items()}, FRAC), c, mask_keys[c], publics, CONTEXT) for c in CLIENTS
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
    shares = dict(zip(CLIENTS, split_secret(raw, n=len(CLIENTS), threshold=3), strict=True))
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
    """Setup messages sealed per client pair, double masking with authenticated peer keys, a
    client that drops after masking, survivors' reveals sealed for the aggregator, and the
    unmasked sum equal to the survivors' FedAvg."""
    from fedlib.secagg.protocol import Session, make_reveal, make_setup, mask_update, open_inbox, relay_setups, unmask_sum
    from fedlib.wire.keys import init_keys, load_keyring
    from tasks.from_config import aggregator_update_key, client_update_key

    init_keys(tmp_path, CLIENTS)
    ring = load_keyring(tmp_path, CLIENTS)
    session = Session("fed", 3, "a1b2", tuple(sorted(CLIENTS)), threshold=3)
    setups = {c: make_setup(ring, c, session) for c in CLIENTS}
    assert make_setup(ring, "aws", session).mask_public == setups["aws"].mask_public  # derived, not stored
    other = Session("fed", 3, "ffff", session.clients, 3)
    assert make_setup(ring, "aws", other).mask_public != setups["aws"].mask_public  # fresh per session
    inboxes = relay_setups(setups)
    peers = {me: open_inbox(ring, me, session, inboxes[me]) for me in CLIENTS}

    deltas, examples, _, _, _ = _round(seed=4)
    masked = {}
    for me in CLIENTS:
        weighted = encode({k: v * examples[me] for k, v in deltas[me].items()}, FRAC)
        masked[me] = mask_update(ring, me, session, peers[me], weighted)
    # The self mask alone hides a lone update even from someone holding all pairwise seeds.
    assert _uniformity_p_value(torch.cat([v.flatten() for v in masked["aws"].values()])) > 1e-6

    dropped, survivors = ["azure"], [c for c in CLIENTS if c != "azure"]
    reveals = {
        s: make_reveal(ring, s, session, peers[s], survivors, dropped, client_update_key(ring, s), _ledger(tmp_path, ring, s))
        for s in survivors
    }
    keys = {s: aggregator_update_key(ring, s) for s in survivors}
    publics = {c: s.mask_public for c, s in setups.items()}
    total = masked_sum(masked[s] for s in survivors)
    clean = unmask_sum(total, session, publics, survivors, dropped, reveals, keys)
    mean = {k: v / sum(examples[s] for s in survivors) for k, v in decode(clean, FRAC).items()}
    expected = _fedavg(deltas, examples, survivors)
    for name in mean:
        torch.testing.assert_close(mean[name], expected[name], atol=1e-6, rtol=0)

    # Any `threshold` reveals suffice; fewer cannot remove the masks.
    three = dict(list(reveals.items())[:3])
    torch.testing.assert_close(unmask_sum(total, session, publics, survivors, dropped, three, keys)["a"], clean["a"])
    from fedlib.secagg.protocol import SecureAggregationFailed

    with pytest.raises(SecureAggregationFailed, match="threshold is 3"):
        unmask_sum(total, session, publics, survivors, dropped, dict(list(reveals.items())[:2]), keys)


def _ledger(tmp_path, ring, client):
    from fedlib.wire.envelope import UpdateKey
    from fedlib.wire.keys import fingerprint
    from fedlib.wire.sealed_stores import RevealLedger

    key = UpdateKey(ring.client_derived_secret(client, "secagg-reveals"), fingerprint(ring.public_key(client)))
    return RevealLedger((tmp_path / "buckets" / client).as_uri(), key, "fed", client)


def test_a_client_never_reveals_both_secrets_of_one_peer(tmp_path):
    from fedlib.secagg.protocol import BadSetups, Session, make_reveal, make_setup, open_inbox, relay_setups
    from fedlib.wire.keys import init_keys, load_keyring
    from tasks.from_config import client_update_key

    init_keys(tmp_path, CLIENTS)
    ring = load_keyring(tmp_path, CLIENTS)
    session = Session("fed", 1, "00", tuple(sorted(CLIENTS)), threshold=3)
    inboxes = relay_setups({c: make_setup(ring, c, session) for c in CLIENTS})
    peers = open_inbox(ring, "aws", session, inboxes["aws"])
    key = client_update_key(ring, "aws")
    ledger = _ledger(tmp_path, ring, "aws")
    with pytest.raises(ValueError, match="both surviving and dropped"):
        make_reveal(ring, "aws", session, peers, ["aws", "gcp"], ["gcp"], key, ledger)
    with pytest.raises(ValueError, match="not among the survivors"):
        make_reveal(ring, "aws", session, peers, ["gcp"], ["azure"], key, ledger)
    # A relayed message swapped to another recipient, or from another session, does not open.
    swapped = {**inboxes["aws"], "gcp": inboxes["azure"]["gcp"]}
    with pytest.raises(BadSetups) as bad:
        open_inbox(ring, "aws", session, swapped)
    assert set(bad.value.complaints) == {"gcp"}  # the sender whose message does not open is named
    with pytest.raises(BadSetups) as bad:
        open_inbox(ring, "aws", Session("fed", 1, "01", session.clients, 3), inboxes["aws"])
    assert set(bad.value.complaints) == set(session.clients) - {"aws"}  # another session: nothing opens
