"""A real 2-client, 2-round federation through the Prefect flow on the ephemeral API, with MLflow
on SQLite: what it tracks, what it stores, and that a failed client does not stop the round."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from peft import PeftModel

from fedlib.config import load_config
from fedlib.model.base import load_base_model
from fedlib.model.training import evaluate_loss
from flows.federated_training import federated_training
from tasks.from_config import checkpoint_store, load_data
from tests.conftest import scan_ciphertext_only, tiny_config_dict, write_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus_dir, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("federation")
    path = write_config(tmp, tiny_config_dict(tmp, corpus_dir, tiny_model_dir))
    manifests = federated_training(str(path))
    return load_config(path), manifests


def test_rounds_committed_and_improving_lineage(finished_run):
    config, manifests = finished_run
    assert [m.round for m in manifests] == [0, 1, 2]
    assert all(m.accepted == ["aws", "gcp"] and not m.rejected for m in manifests[1:])
    store = checkpoint_store(config)
    assert store.latest_round() == 2
    assert store.manifest(2).adapter_sha256 == manifests[2].adapter_sha256
    assert {m.mlflow_run_id for m in manifests} == {manifests[0].mlflow_run_id}
    assert manifests[2].eval_loss < manifests[0].eval_loss  # training helped the held-out text


def test_mlflow_holds_metrics_params_and_artifacts(finished_run):
    config, manifests = finished_run
    client = MlflowClient(config.tracking_uri)
    run = client.get_run(manifests[0].mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.local_steps"] == "3" and run.data.params["clouds.1.name"] == "gcp"
    # params only for the sections this run uses, and no unset value as the string "None"
    assert not [k for k in run.data.params if k.split(".")[0] in ("split", "privacy", "secure_aggregation", "keyring")]
    assert "None" not in run.data.params.values() and "training.torch_threads" not in run.data.params
    # MLflow's UI opens the experiment on its runs (a fine-tuning experiment), not on GenAI traces
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"

    def history(name):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}

    assert history("eval/perplexity") == pytest.approx({r: m.perplexity for r, m in enumerate(manifests)})
    for cloud in ("aws", "gcp"):
        assert set(history(f"client/{cloud}/train_loss")) == {1, 2}
        assert history(f"client/{cloud}/bytes_uploaded")[2] == manifests[2].clients[cloud].bytes_uploaded > 0
        assert history(f"client/{cloud}/num_examples")[1] > 0
    # Each client scored the adapter it received on its own validation split (held-out blocks the
    # aggregator does not score), and the token-weighted mean is logged at that adapter's round.
    for manifest in manifests[1:]:
        assert all(r.validation_tokens == 8 * 31 and r.validation_loss > 0 for r in manifest.clients.values())
    federated = history("client_stated/federated_perplexity")
    assert set(federated) == {0, 1} and federated[0] == pytest.approx(math.exp(manifests[1].federated_eval_loss))
    for stage in ("train_s", "encrypt_upload_s", "download_decrypt_s", "aggregate_s", "evaluate_s", "round_s", "partition_s"):
        assert history(f"time/{stage}")[2] >= 0, stage
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "manifests")} == {f"manifests/round-000{r}.json" for r in range(3)}
    plot = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/progress.png", tracking_uri=config.tracking_uri)
    )
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_final_adapter_loads_with_peft_and_reproduces_eval_loss(finished_run):
    config, manifests = finished_run
    folder = mlflow.artifacts.download_artifacts(
        run_id=manifests[0].mlflow_run_id, artifact_path="adapter", tracking_uri=config.tracking_uri
    )
    model = PeftModel.from_pretrained(load_base_model(config.model.source), folder)
    loss = evaluate_loss(model, load_data(config).evaluation, config.evaluation.batch_size)
    assert loss == pytest.approx(manifests[-1].eval_loss, abs=1e-5)
    assert math.exp(loss) < manifests[0].perplexity


def test_cloud_folders_hold_ciphertext_only(finished_run):
    config, manifests = finished_run
    assert scan_ciphertext_only(config, {}) == 2 * 2 + 2  # two clients, two rounds, and each one's data shard
    for cloud in config.clouds:
        folder = Path(config.storage_url(cloud).removeprefix("file://"))
        assert {p.parent.name for p in folder.rglob("*.update")} == {"round-0001", "round-0002"}
        assert len(list(folder.rglob("*.shard"))) == 1
        assert {p.suffix for p in folder.rglob("*") if p.is_file()} == {".update", ".shard"}


def test_prefect_recorded_the_round_dag(finished_run):
    from prefect.client.orchestration import get_client

    async def names():
        async with get_client() as client:
            flows = await client.read_flow_runs()
            tasks = await client.read_task_runs()
        return {f.name for f in flows}, {t.name for t in tasks}

    flows, tasks = asyncio.run(names())
    assert {"round-1", "round-2"} <= flows
    assert {"train-aws-round-1", "train-gcp-round-2", "aggregate-round-2", "score-round-2", "checkpoint-round-2"} <= tasks


def test_failed_client_is_left_out_and_round_goes_on(tmp_path, corpus_dir, tiny_model_dir):
    """azure cannot write its bucket: its preflight says so before round 1, it is left out of
    every round with that line, and the others go on."""
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir, clouds=("aws", "gcp", "azure"))
    raw["training"]["rounds"] = 1
    raw["clouds"][2]["storage"] = "file:///proc/fedlib-cannot-write-here"
    manifests = federated_training(str(write_config(tmp_path, raw)))
    last = manifests[-1]
    assert last.accepted == ["aws", "gcp"] and last.sampled == ["aws", "gcp", "azure"]
    assert last.rejected["azure"].reason == "misconfigured"
    assert last.rejected["azure"].detail.startswith("azure: clouds[azure].storage: cannot write to 'file:///proc/fedlib-cannot-write-here'")
    adapter = checkpoint_store(load_config(tmp_path / "federation.yaml")).adapter(1)
    assert all(torch.isfinite(t).all() for t in adapter.values())
