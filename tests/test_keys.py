"""X25519 key pairs per party, update keys only the two parties can derive, signed manifests."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from fedlib.rejection import Reason, UpdateRejected
from fedlib.round.checkpoint import CheckpointStore, ManifestRejected, ManifestSignatureError
from fedlib.round.manifest import Manifest, RoundScore, score_to_json
from fedlib.wire.envelope import EnvelopeContext, open_sealed, seal
from fedlib.wire.keys import init_keys, load_keyring
from tasks.from_config import aggregator_update_key, client_update_key

CLIENTS = ["aws", "gcp"]


def test_keys_are_private_files_and_kept_on_rerun(tmp_path):
    created = init_keys(tmp_path, CLIENTS)
    assert len(created) == 4
    for path in created:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = {p: p.read_bytes() for p in created}
    assert init_keys(tmp_path, CLIENTS) == []  # nothing replaced
    assert all(p.read_bytes() == b for p, b in before.items())
    (tmp_path / "clients" / "gcp.x25519.pem").chmod(0o644)
    with pytest.raises(PermissionError, match="gcp.x25519.pem.*chmod 600"):
        load_keyring(tmp_path, CLIENTS)
    with pytest.raises(FileNotFoundError, match="azure.x25519.pub: missing key"):
        load_keyring(tmp_path, ["aws", "azure"])


def test_a_party_holding_only_its_own_private_key(tmp_path):
    """A client's folder: every `.pub`, and its own private key only. It can seal for the
    aggregator and check manifests, but not open another client's update or sign."""
    import shutil

    init_keys(tmp_path / "all", CLIENTS)
    full = load_keyring(tmp_path / "all", CLIENTS)
    mine = tmp_path / "aws-only"
    shutil.copytree(tmp_path / "all", mine)
    for private in [mine / "aggregator.x25519.pem", mine / "aggregator.ed25519.pem", mine / "clients" / "gcp.x25519.pem"]:
        private.unlink()
    ring = load_keyring(mine, CLIENTS)
    assert set(ring.client_private) == {"aws"} and ring.aggregator_private is None and ring.signing_private is None
    ctx = EnvelopeContext("fed", 1, "aws")
    blob = seal(b"payload", client_update_key(ring, "aws"), ctx)
    assert open_sealed(blob, aggregator_update_key(full, "aws"), ctx) == b"payload"
    with pytest.raises(KeyError, match="no private key for client 'gcp'"):
        client_update_key(ring, "gcp")
    with pytest.raises(KeyError, match="no aggregator private key"):
        aggregator_update_key(ring, "aws")
    assert init_keys(mine, CLIENTS) == []  # a party's init never mints keys for the others


def test_only_client_and_aggregator_share_an_update_key(tmp_path):
    init_keys(tmp_path, CLIENTS)
    ring = load_keyring(tmp_path, CLIENTS)
    ctx = EnvelopeContext("fed", 1, "aws")
    aws, aggregator_view = client_update_key(ring, "aws"), aggregator_update_key(ring, "aws")
    assert aws == aggregator_view  # both ends of the exchange derive the same secret
    assert aws.secret != client_update_key(ring, "gcp").secret
    blob = seal(b"payload", aws, ctx)
    assert open_sealed(blob, aggregator_view, ctx) == b"payload"
    with pytest.raises(UpdateRejected) as info:
        open_sealed(blob, aggregator_update_key(ring, "gcp"), ctx)  # gcp's key for aws's object
    assert info.value.reason is Reason.WRONG_KEY
    other = tmp_path / "other"
    init_keys(other, CLIENTS)
    stranger = load_keyring(other, CLIENTS)  # a different aggregator: same names, other keys
    with pytest.raises(UpdateRejected) as info:
        open_sealed(blob, aggregator_update_key(stranger, "aws"), ctx)
    assert info.value.reason is Reason.WRONG_KEY


def test_manifests_are_signed_and_checked(tmp_path):
    init_keys(tmp_path / "keys", CLIENTS)
    ring = load_keyring(tmp_path / "keys", CLIENTS)
    root = (tmp_path / "ckpt").as_uri()
    store = CheckpointStore(root, "fed", signer=ring.signing_private, verifier=ring.signing_public)
    base = store.commit({"w": torch.zeros(2)}, Manifest("fed", 0, 1, "run"))
    store.commit({"w": torch.ones(2)}, Manifest("fed", 1, 1, "run", parent_adapter_sha256=base.adapter_sha256, accepted=["aws"]))
    reader = CheckpointStore(root, "fed", verifier=ring.signing_public)  # a client: public key only
    assert reader.manifest(1).accepted == ["aws"]
    assert torch.equal(reader.adapter(1)["w"], torch.ones(2))

    path = tmp_path / "ckpt" / "round-0001" / "manifest.json"
    record = json.loads(path.read_text())
    forged = json.loads(record["manifest"])
    forged["accepted"] = ["aws", "gcp"]
    path.write_text(json.dumps({**record, "manifest": json.dumps(forged, indent=2)}))
    with pytest.raises(ManifestSignatureError, match="round-0001/manifest.json: signature"):
        reader.manifest(1)
    path.write_text(json.dumps({**record, "signature": ""}))
    with pytest.raises(ManifestSignatureError):
        reader.manifest(1)


def test_a_round_score_is_signed_placed_and_bound_to_the_adapter_it_scored(tmp_path, caplog):
    """The held-out score is its own signed record beside the manifest (the next round does not
    wait for it), and the champion is chosen from it. A forged score, another round's, a score
    of another adapter (a rolled-back lineage's round 1, signed with the same key) or another
    signed record in its place is refused, and the round reads as unscored, to be scored again."""
    init_keys(tmp_path / "keys", CLIENTS)
    ring = load_keyring(tmp_path / "keys", CLIENTS)
    root = (tmp_path / "ckpt").as_uri()
    store = CheckpointStore(root, "fed", signer=ring.signing_private, verifier=ring.signing_public)
    base = store.commit({"w": torch.zeros(2)}, Manifest("fed", 0, 2, "run"))
    one = store.commit({"w": torch.ones(2)}, Manifest("fed", 1, 2, "run", parent_adapter_sha256=base.adapter_sha256))
    two = store.commit({"w": torch.ones(2) * 2}, Manifest("fed", 2, 2, "run", parent_adapter_sha256=one.adapter_sha256))
    reader = CheckpointStore(root, "fed", verifier=ring.signing_public)
    assert reader.manifest(1).eval_loss is None and reader.manifest(1).perplexity is None  # committed, not yet scored
    store.commit_score(RoundScore("fed", 1, one.adapter_sha256, 1.5, 3.0))
    store.commit_score(RoundScore("fed", 2, two.adapter_sha256, 1.25))
    assert reader.manifest(1).eval_loss == 1.5 and reader.manifest(1).timings["evaluate_s"] == 3.0
    assert [m.eval_loss for m in reader.manifests()] == [None, 1.5, 1.25]
    with pytest.raises(ManifestRejected, match="names an adapter its manifest does not"):
        store.commit_score(RoundScore("fed", 1, two.adapter_sha256, 0.1))

    path = tmp_path / "ckpt" / "round-0001" / "score.json"
    honest = path.read_text()
    record = json.loads(honest)
    forged = json.loads(record["manifest"])
    forged["eval_loss"] = 0.1
    replays = {
        "forged": json.dumps({**record, "manifest": json.dumps(forged)}),
        "round 2's": (tmp_path / "ckpt" / "round-0002" / "score.json").read_text(),
        "another adapter's": store._signed(score_to_json(RoundScore("fed", 1, "0" * 64, 0.1))).decode(),
        "a manifest": (tmp_path / "ckpt" / "round-0001" / "manifest.json").read_text(),
    }
    for what, text in replays.items():
        path.write_text(text)
        caplog.clear()
        assert reader.manifest(1).eval_loss is None, what
        assert "score of round 1 ignored" in caplog.text, what
    path.write_text(honest)
    assert reader.manifest(1).eval_loss == 1.5


def test_the_head_a_client_reads_is_signed_placed_and_falls_back_to_the_manifest(tmp_path):
    """`head.json` is what a client reads of a round: the lineage and digests, a tenth of the
    manifest. It is signed and placed like the manifest; a forged one is refused, another round's
    is refused, and a missing one (a commit that crashed before it) is read from the manifest."""
    init_keys(tmp_path / "keys", CLIENTS)
    ring = load_keyring(tmp_path / "keys", CLIENTS)
    root = (tmp_path / "ckpt").as_uri()
    store = CheckpointStore(root, "fed", signer=ring.signing_private, verifier=ring.signing_public)
    base = store.commit({"w": torch.zeros(2)}, Manifest("fed", 0, 2, "run"))
    one = store.commit({"w": torch.ones(2)}, Manifest("fed", 1, 2, "run", parent_adapter_sha256=base.adapter_sha256, accepted=["aws"]))
    store.commit({"w": torch.ones(2) * 2}, Manifest("fed", 2, 2, "run", parent_adapter_sha256=one.adapter_sha256))
    reader = CheckpointStore(root, "fed", verifier=ring.signing_public)
    head, size = reader.head_read(1)
    assert head == one.head() and head.accepted == ("aws",) and size < reader.manifest_read(1)[1]
    assert torch.equal(reader.adapter_of(head)[0]["w"], torch.ones(2))
    assert reader.last_accepted_round("aws", 3) == 1 and reader.last_accepted_round("gcp", 3) is None

    path = tmp_path / "ckpt" / "round-0001" / "head.json"
    record = json.loads(path.read_text())
    forged = json.loads(record["manifest"])
    forged["accepted"] = ["aws", "gcp"]
    path.write_text(json.dumps({**record, "manifest": json.dumps(forged)}))
    with pytest.raises(ManifestSignatureError, match="round-0001/head.json: signature"):
        reader.head_read(1)
    path.write_text((tmp_path / "ckpt" / "round-0002" / "head.json").read_text())  # round 2's, signed, in round 1's place
    with pytest.raises(ManifestRejected, match="round 2, not 'fed' round 1"):
        reader.head_read(1)
    path.unlink()
    assert reader.head_read(1) == (one.head(), reader.manifest_read(1)[1])


def test_keys_init_command(tmp_path, corpus_dir, tiny_model_dir, capsys):
    from fedlib_cli.main import main
    from tests.conftest import tiny_config_dict, write_config

    path = write_config(tmp_path, tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir))
    assert main(["keys", "init", str(path)]) == 0
    assert "4 key(s) created" in capsys.readouterr().out
    folder = tmp_path / "data" / "keys"
    assert sorted(p.name for p in folder.rglob("*.pem")) == [
        "aggregator.ed25519.pem",
        "aggregator.x25519.pem",
        "aws.x25519.pem",
        "gcp.x25519.pem",
    ]
    assert main(["keys", "init", str(path)]) == 0
    assert "0 key(s) created" in capsys.readouterr().out
    path.write_text("clouds: 3\n")
    assert main(["keys", "init", str(path)]) == 2  # a bad config is refused before any key is made


def _party_config(tmp_path, publics: dict, key_source: str) -> dict:
    return {
        "federation": {"id": "keys", "data_dir": str(tmp_path / "data")},
        "keyring": {**publics, "key_source": key_source},
        "clouds": [{"name": "aws"}, {"name": "gcp"}],
    }


def test_each_party_holds_only_its_own_key_from_its_source(tmp_path, monkeypatch, capsys):
    """`fedlib keys init --party NAME` on each machine; the config carries the public halves; a
    party's process loads its own private key (file or environment) and nobody else's."""
    import subprocess
    import sys

    import yaml

    from fedlib.config import parse_config
    from fedlib.wire.keys import AGGREGATOR, fingerprint, parse_party_pem
    from fedlib_cli.main import main
    from tasks.from_config import keyring

    publics = {"clients": {}}
    for party in (AGGREGATOR, "aws", "gcp"):
        done = subprocess.run(
            [sys.executable, "-m", "fedlib_cli", "keys", "init", "--party", party, "--out", str(tmp_path / f"{party}.pem")],
            capture_output=True,
            text=True,
            check=True,
        )
        printed = yaml.safe_load(done.stdout)
        if party == AGGREGATOR:
            publics["aggregator"] = printed["aggregator"]
        else:
            publics["clients"].update(printed["clients"])
        assert stat.S_IMODE((tmp_path / f"{party}.pem").stat().st_mode) == 0o600
    raw = _party_config(tmp_path, publics, f"file:{tmp_path}/{{party}}.pem")
    config = parse_config(raw)
    config_file = tmp_path / "federation.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    for party in (AGGREGATOR, "aws", "gcp"):  # each party trusts the keyring on its own machine
        assert main(["keys", "trust", str(config_file), "--party", party]) == 0
        assert f"aggregator exchange {fingerprint(config.keyring.publics.aggregator_exchange)}" in capsys.readouterr().out

    aws = keyring(config, "aws")
    assert set(aws.client_private) == {"aws"} and aws.aggregator_private is None and aws.signing_private is None
    aggregator = keyring(config, AGGREGATOR)
    assert aggregator.aggregator_private is not None and aggregator.signing_private is not None and not aggregator.client_private
    ctx = EnvelopeContext("keys", 1, "aws")
    assert open_sealed(seal(b"x", client_update_key(aws, "aws"), ctx), aggregator_update_key(aggregator, "aws"), ctx) == b"x"
    assert keyring(config).client_private == {}  # no party: public keys only

    # gcp's key presented as aws's is named by fingerprint, not used.
    swapped = parse_config(_party_config(tmp_path, publics, f"file:{tmp_path}/gcp.pem"))
    with pytest.raises(ValueError, match="aws's private key .fingerprint .* does not match"):
        keyring(swapped, "aws")
    # From an environment variable instead of a file.
    monkeypatch.setenv("FEDLIB_KEY_AWS", (tmp_path / "aws.pem").read_text())
    from_env = keyring(parse_config(_party_config(tmp_path, publics, "env:FEDLIB_KEY_{party}".replace("{party}", "AWS"))), "aws")
    assert fingerprint(from_env.client_private["aws"].public_key()) == fingerprint(
        parse_party_pem((tmp_path / "aws.pem").read_bytes(), "aws")[0].public_key()
    )
    (tmp_path / "gcp.pem").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keyring(config, "gcp")
    again = subprocess.run(
        [sys.executable, "-m", "fedlib_cli", "keys", "init", "--party", "aws", "--out", str(tmp_path / "aws.pem")],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "a party's key is made once" in again.stderr


def test_a_keyring_section_must_list_every_cloud_and_decode(tmp_path):
    from fedlib.config import ConfigError, parse_config
    from fedlib.wire.keys import new_party_keys, public_text

    aggregator = [k.public_key() for k in new_party_keys("aggregator")]
    publics = {
        "aggregator": {"exchange": public_text(aggregator[0]), "signing": public_text(aggregator[1])},
        "clients": {"aws": public_text(new_party_keys("aws")[0].public_key())},
    }
    with pytest.raises(ConfigError, match="keyring.clients: lists \\['aws'\\], the clouds are \\['aws', 'gcp'\\]"):
        parse_config(_party_config(tmp_path, publics, "file:~/k.pem"))
    publics["clients"]["gcp"] = "bm90IGEga2V5"
    with pytest.raises(ConfigError, match="keyring.clients.gcp: 9 bytes, a public key has 32"):
        parse_config(_party_config(tmp_path, publics, "file:~/k.pem"))
    publics["clients"]["gcp"] = publics["clients"]["aws"]
    with pytest.raises(ConfigError, match="expected file:PATH, env:VAR or secret:BLOCK"):
        parse_config(_party_config(tmp_path, publics, "vault:k"))
