"""X25519 key pairs per party, update keys only the two parties can derive, signed manifests."""

from __future__ import annotations

import json
import stat

import pytest
import torch

from fedlib.checkpoint import CheckpointStore, ManifestSignatureError
from fedlib.manifest import Manifest
from fedlib.envelope import EnvelopeContext, open_sealed, seal
from fedlib.federation import aggregator_update_key, client_update_key
from fedlib.keys import init_keys, load_keyring
from fedlib.rejection import Reason, UpdateRejected

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
    base = store.commit({"w": torch.zeros(2)}, Manifest("fed", 0, 1, "run", 2.0, 7.4))
    store.commit({"w": torch.ones(2)}, Manifest("fed", 1, 1, "run", 1.5, 4.5, parent_adapter_sha256=base.adapter_sha256))
    reader = CheckpointStore(root, "fed", verifier=ring.signing_public)  # a client: public key only
    assert reader.manifest(1).eval_loss == 1.5
    assert torch.equal(reader.adapter(1)["w"], torch.ones(2))

    path = tmp_path / "ckpt" / "round-0001" / "manifest.json"
    record = json.loads(path.read_text())
    forged = json.loads(record["manifest"])
    forged["eval_loss"] = 0.1
    path.write_text(json.dumps({**record, "manifest": json.dumps(forged, indent=2)}))
    with pytest.raises(ManifestSignatureError, match="round-0001/manifest.json: signature"):
        reader.manifest(1)
    path.write_text(json.dumps({**record, "signature": ""}))
    with pytest.raises(ManifestSignatureError):
        reader.manifest(1)


def test_keys_init_command(tmp_path, corpus_dir, tiny_model_dir, capsys):
    from flows.cli import main
    from tests.conftest import tiny_config_dict, write_config

    path = write_config(tmp_path, tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir))
    assert main(["keys", "init", str(path)]) == 0
    assert "4 key(s) created" in capsys.readouterr().out
    folder = tmp_path / "data" / "keys"
    assert sorted(p.name for p in folder.rglob("*.pem")) == [
        "aggregator.ed25519.pem", "aggregator.x25519.pem", "aws.x25519.pem", "gcp.x25519.pem",
    ]
    assert main(["keys", "init", str(path)]) == 0
    assert "0 key(s) created" in capsys.readouterr().out
    path.write_text("clouds: 3\n")
    assert main(["keys", "init", str(path)]) == 2  # a bad config is refused before any key is made
