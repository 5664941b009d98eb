"""The split channel: activations and gradients cross sealed, in sequence; tampered, replayed,
reordered, misdirected or foreign-session messages are refused by name."""

from __future__ import annotations

import pytest
import torch

from fedlib.rejection import Reason, UpdateRejected
from fedlib.split.channel import HelloChallenges, client_hello, server_accept
from fedlib.wire.keys import init_keys, load_keyring


@pytest.fixture
def ends(tmp_path):
    init_keys(tmp_path, ["aws"])
    ring = load_keyring(tmp_path, ["aws"])
    hello, pending = client_hello(ring, "aws", HelloChallenges().issue(0.0))
    accepted = server_accept(ring, hello)
    return pending.finish(accepted.server_nonce, accepted.server_ephemeral), accepted.channel, ring


def test_activations_and_gradients_cross_in_order(ends):
    client, server, _ = ends
    activations = {"h": torch.randn(2, 8, 16)}
    blob = client.seal("activations", activations)
    raw = activations["h"].numpy().tobytes()
    assert raw[:64] not in blob and b"activations" not in blob  # nothing in the clear, not even the kind
    torch.testing.assert_close(server.open("activations", blob)["h"], activations["h"])
    grads = {"g": torch.randn(2, 8, 16)}
    torch.testing.assert_close(client.open("gradients", server.seal("gradients", grads))["g"], grads["g"])
    assert client.bytes_sent == len(blob)


@pytest.mark.parametrize(
    ("attack", "reason"),
    [
        ("tamper", Reason.AUTHENTICATION_FAILED),
        ("replay", Reason.REPLAYED),
        ("reorder", Reason.WRONG_ROUND),
        ("reflect", Reason.WRONG_CLIENT),
        ("truncate", Reason.TRUNCATED),
    ],
)
def test_bad_messages_are_refused_by_name(ends, attack, reason):
    client, server, _ = ends
    first = client.seal("activations", {"h": torch.ones(4)})
    second = client.seal("activations", {"h": torch.zeros(4)})
    server.open("activations", first)
    blob = {
        "tamper": second[:-20] + bytes([second[-20] ^ 1]) + second[-19:],
        "replay": first,
        "reorder": client.seal("activations", {"h": torch.ones(1)}),  # message 2 before message 1
        "reflect": [server.seal("activations", {"h": torch.ones(4)}) for _ in range(2)][1],  # its own, with the right number
        "truncate": second[:-5],
    }[attack]
    with pytest.raises(UpdateRejected) as info:
        server.open("activations", blob)
    assert info.value.reason is reason
    assert server.received == 1  # nothing was accepted; the genuine next message still opens
    if attack != "reorder":
        torch.testing.assert_close(server.open("activations", second)["h"], torch.zeros(4))


def test_another_session_cannot_open_this_one(ends):
    client, _, ring = ends
    other_hello, _ = client_hello(ring, "aws", HelloChallenges().issue(0.0))
    stranger = server_accept(ring, other_hello).channel
    with pytest.raises(UpdateRejected) as info:
        stranger.open("activations", client.seal("activations", {"h": torch.ones(2)}))
    assert info.value.reason is Reason.WRONG_FEDERATION  # the session id is bound into every header


def test_a_hello_is_bound_to_its_challenge(tmp_path):
    """The proof covers the challenge: a recorded hello with a freshly issued challenge pasted in
    does not open, and a challenge is this process's, for a while."""
    init_keys(tmp_path, ["aws"])
    ring = load_keyring(tmp_path, ["aws"])
    challenges = HelloChallenges(ttl_s=60)
    hello, _ = client_hello(ring, "aws", challenges.issue(1000.0))
    challenges.check(hello["challenge"], 1030.0)
    server_accept(ring, hello)
    for later, other in ((1061.0, challenges), (1000.0, HelloChallenges(ttl_s=60))):
        with pytest.raises(UpdateRejected) as info:
            other.check(hello["challenge"], later)
        assert info.value.reason is Reason.STALE
    with pytest.raises(UpdateRejected) as info:
        server_accept(ring, hello | {"challenge": challenges.issue(1000.0)})
    assert info.value.reason in (Reason.WRONG_FEDERATION, Reason.AUTHENTICATION_FAILED)  # the proof names its challenge
    with pytest.raises(UpdateRejected) as info:
        challenges.check({"not": "a string"}, 1000.0)
    assert info.value.reason is Reason.MALFORMED
