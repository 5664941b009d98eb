"""Split fine-tuning for real: a server process holding the middle blocks, clients over HTTP on
127.0.0.1, sealed messages both ways, a Prefect flow tracked in MLflow."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from fedlib.config import SplitConfig, load_config
from fedlib.rejection import Reason, UpdateRejected
from fedlib.split.attestation import check_attestation
from fedlib.tee.evidence import AttestationFailed, NoTEE, Refusal
from flows.split_finetune import split_finetune
from tasks.from_config import keyring, load_data
from tasks.split import connect_client, start_server
from tests.conftest import tiny_config_dict, write_config


def _split_config(tmp_path, corpus_dir, model_dir, clouds=("aws", "gcp"), **split):
    raw = tiny_config_dict(tmp_path, corpus_dir, model_dir, clouds=clouds)
    raw["split"] = {"cut": 1, "steps": 6, "rounds": 2, "learning_rate": 0.01, "spf_fraction": 0.01, **split}
    return write_config(tmp_path, raw)


def test_split_flow_lowers_perplexity_and_logs_each_step(tmp_path, corpus_dir, tiny_model_dir):
    path = _split_config(tmp_path, corpus_dir, tiny_model_dir)
    out = split_finetune(str(path))
    assert out["rounds"][-1]["perplexity"] < out["perplexity_before"]
    config = load_config(path)
    client = MlflowClient(config.tracking_uri)
    history = {name: client.get_metric_history(out["run_id"], name) for name in ("split/loss", "split/bytes_per_step", "split/step_s")}
    assert all(len(h) == 2 * 2 * 6 for h in history.values())  # 2 rounds × 2 clients × 6 steps
    assert all(m.value > 0 for m in history["split/bytes_per_step"])
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "split")}
    assert artifacts == {"split/client-part.safetensors", "split/server-part.safetensors"}


@pytest.fixture
def server(tmp_path, corpus_dir, tiny_model_dir):
    path = _split_config(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws",))
    config = load_config(path)
    keyring(config, create=True)
    process = start_server(str(path), 120)
    yield config, process.url
    process.stop()


def test_no_plaintext_activation_crosses_the_channel(server):
    config, url = server
    worker = connect_client(config, "aws", url, keep_wire=True)
    batch = load_data(config).train.tokens[:2]
    worker.calibrate([batch])
    seen = []
    hook = worker.front.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    stats = worker.train_step(batch)
    hook.remove()
    wire = b"".join(worker.transport.wire)
    assert stats.bytes > 0 and len(wire) > seen[0].numel() * 4
    raw = seen[0].numpy().tobytes()
    runs = [raw[i : i + 64] for i in range(0, len(raw) - 64, 997)]
    assert runs and not any(run in wire for run in runs)
    assert b"safetensors" not in wire and b'"dtype"' not in wire


def test_tampered_and_replayed_messages_are_refused_by_the_server(server):
    config, url = server
    worker = connect_client(config, "aws", url, keep_wire=True)
    batch = load_data(config).train.tokens[:2]
    worker.calibrate([batch])
    session = worker.channel.session
    first = worker.channel.seal("train-activations", {"hidden": worker.front(batch).detach()})
    worker.transport.post(f"/{session}/train/forward", first)
    with pytest.raises(UpdateRejected) as info:  # the same message again
        worker.transport.post(f"/{session}/train/forward", first)
    assert info.value.reason is Reason.REPLAYED
    second = bytearray(worker.channel.seal("train-activations", {"hidden": worker.front(batch).detach()}))
    second[-3] ^= 0x40
    with pytest.raises(UpdateRejected) as info:
        worker.transport.post(f"/{session}/train/forward", bytes(second))
    assert info.value.reason is Reason.AUTHENTICATION_FAILED


def test_no_tee_is_said_and_refused_when_one_is_required():
    binding = bytes(range(32))
    evidence = NoTEE().evidence(binding)
    assert evidence == {"tee": "none", "binding": binding.hex()}
    check_attestation(evidence, binding, SplitConfig())  # nothing claimed, nothing checked
    unverified = SplitConfig().model_copy(update={"require_tee": True})  # what the config itself refuses to build
    with pytest.raises(AttestationFailed, match="split.attestation.verifier is not") as info:
        check_attestation(evidence, binding, unverified)
    assert info.value.reason is Refusal.NOT_CONFIGURED
    required = SplitConfig(require_tee=True, attestation={"verifier": "amd-sev-snp", "measurement": "ab" * 48})
    with pytest.raises(AttestationFailed, match="runs in no TEE") as info:
        check_attestation(evidence, binding, required)
    assert info.value.reason is Refusal.NO_TEE
    with pytest.raises(AttestationFailed) as info:
        check_attestation(
            {"tee": "amd-sev-snp"},
            binding,
            required.model_copy(update={"attestation": required.attestation.model_copy(update={"verifier": "sgx"})}),
        )
    assert info.value.reason is Refusal.NOT_CONFIGURED and "unknown attestation verifier 'sgx'" in str(info.value)
