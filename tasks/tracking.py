"""MLflow: one run per federation lineage, a step per round, artifacts people open first."""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.model.base import save_adapter_folder
from fedlib.reports.plots import loss_figure, progress_figure
from fedlib.round.manifest import Manifest, to_json
from tasks.from_config import Tensors, evaluation_examples, load_data


def _client(config: FederationConfig) -> MlflowClient:
    # An explicit client, not the fluent API: tasks run in worker threads with no active run.
    return MlflowClient(tracking_uri=config.tracking_uri)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if value is None:  # unset: the default the docs name, not the string "None"
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, dict) for v in value):
        for i, inner in enumerate(value):
            _flatten(f"{prefix}.{i}", inner, out)
    else:
        out[prefix] = str(value)[:6000]


# MLflow 3's UI opens an experiment by its kind; without one it guesses GenAI and shows traces.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "finetuning"}


def _sections_in_use(params: dict[str, Any], config: FederationConfig, split: bool) -> dict[str, Any]:
    """The config as the run's params, less the sections this run does not use: split's outside
    a split run, privacy's and secure aggregation's when off, the keyring's public keys."""
    unused = {"keyring"} | ({"privacy"} if not config.privacy.enabled else set())
    unused |= {"secure_aggregation"} if not config.secure_aggregation.enabled else set()
    unused |= {"split"} if not split else set()
    return {section: value for section, value in params.items() if section not in unused}


@task(name="open-tracking", task_run_name="open-tracking", cache_policy=NO_CACHE)
def open_tracking(config: FederationConfig, run_id: str | None, run_name: str | None = None) -> str:
    """Reopen the lineage's run if there is one, otherwise create the experiment and a run
    (named for the federation unless `run_name` is given)."""
    client = _client(config)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment = client.get_experiment_by_name(config.experiment_name)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(config.experiment_name, artifact_location=config.artifact_location, tags=EXPERIMENT_TAGS)
    )
    tags = {"fedlib.federation": config.federation.id, "fedlib.client_stated": CLIENT_STATED}
    run = client.create_run(experiment_id, run_name=run_name or config.federation.id, tags=tags)
    params: dict[str, str] = {}
    _flatten("", _sections_in_use(config.model_dump(mode="json"), config, split=run_name is not None), params)
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in sorted(params.items())])
    return run.info.run_id


# What only the clients can know, as they state it inside their sealed updates: shown, never
# relied on (the aggregator holds train_s and bytes_downloaded to its own measurements).
CLIENT_STATED = (
    "client/<c>/{train_loss,train_s,update_norm,bytes_downloaded,validation_loss,validation_tokens,tokens_per_s}, "
    "system/<c>/*, client_stated/federated_loss, client_stated/federated_perplexity"
)
_CLIENT_METRICS = (
    "train_loss",
    "num_examples",
    "bytes_uploaded",
    "bytes_downloaded",
    "train_s",
    "encrypt_upload_s",
    "update_norm",
    "local_steps",
    "validation_tokens",
    "tokens_per_s",
)
_SYSTEM_METRICS = ("peak_memory_mib", "gpu_memory_mib", "cpu_util")


def round_metrics(manifest: Manifest) -> dict[str, float]:
    """The numbers of one committed round, named for MLflow's metric groups."""
    metrics: dict[str, float] = {}
    if manifest.eval_loss is not None:  # joined from the round's score record
        metrics |= {"eval/loss": manifest.eval_loss, "eval/perplexity": math.exp(manifest.eval_loss)}
    for client, report in manifest.clients.items():
        for name in _CLIENT_METRICS:
            if getattr(report, name) is not None:  # a client's loss and norm are not sent under secure aggregation
                metrics[f"client/{client}/{name}"] = getattr(report, name)
        for name in _SYSTEM_METRICS:  # measured by the client, sealed in its update
            metrics[f"system/{client}/{name}"] = getattr(report, name)
        if report.validation_loss is not None:
            metrics[f"client/{client}/validation_loss"] = report.validation_loss
    for client, sent in manifest.protocol_bytes.items():  # secure aggregation's setup and reveal messages
        metrics[f"client/{client}/protocol_bytes_up"] = sent.up
        metrics[f"client/{client}/protocol_bytes_down"] = sent.down
    for client, money in manifest.cost.items():
        metrics[f"cost/{client}"] = money
    if manifest.round > 0:
        metrics["round/bytes_uploaded"] = manifest.bytes_uploaded
        metrics["round/bytes_crossing_clouds"] = manifest.bytes_crossing_clouds
        metrics["round/cost"] = sum(manifest.cost.values())
        metrics["round/accepted"] = len(manifest.accepted)
        metrics["round/rejected"] = len(manifest.rejected)
        metrics["round/stragglers"] = len(manifest.stragglers)
    if manifest.privacy is not None:
        metrics["privacy/epsilon"] = manifest.privacy.epsilon
    for stage, seconds in manifest.timings.items():
        metrics[f"time/{stage}"] = seconds
    return {k: float(v) for k, v in metrics.items()}


def round_datasets(manifest: Manifest) -> list[DatasetInput]:
    """Each client's training data as an MLflow dataset: its name, the digest and size the
    client reported in its sealed update, and nothing of its text (MLflow lists a dataset once
    per digest, so a client's unchanged data shows once)."""
    out = []
    for name, report in sorted(manifest.clients.items()):
        if not report.data_digest:
            continue
        dataset = Dataset(
            name=f"{name}-train",
            digest=report.data_digest,
            source_type="fedlib-client",
            source=json.dumps({"client": name}),
            profile=json.dumps({"num_examples": report.num_examples}),
        )
        out.append(DatasetInput(dataset, [InputTag("mlflow.data.context", "training"), InputTag("client", name)]))
    return out


def evaluation_dataset(config: FederationConfig, examples_digest: str, size: int) -> DatasetInput:
    if config.evaluation.data:
        urls = list(config.evaluation.data)
    else:
        urls = [f"{config.data.corpus or 'urls'}:{','.join(load_data(config).held_out_names)}"]
    source = json.dumps({"urls": urls})
    dataset = Dataset(
        name="evaluation",
        digest=examples_digest,
        source_type="fedlib-aggregator",
        source=source,
        profile=json.dumps({"num_examples": size}),
    )
    return DatasetInput(dataset, [InputTag("mlflow.data.context", "evaluation")])


@task(name="tracked-rounds", cache_policy=NO_CACHE)
def tracked_rounds(config: FederationConfig, run_id: str) -> set[int]:
    """The rounds whose metrics the run already holds (a crash can come between a round's
    commit and its tracking; the resumed run logs what is missing, once)."""
    return {m.step for m in _client(config).get_metric_history(run_id, "eval/perplexity")}


@task(name="track-round", task_run_name="track-round-{round_number}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def track_round(config: FederationConfig, run_id: str, round_number: int, manifests: list[Manifest], logged_at_ms: int) -> None:
    """Metrics and manifest of `round_number`, and the progress plot redrawn over all rounds.

    `logged_at_ms` is fixed by the caller, not read here: a retry (of this task, or of MLflow's
    client after a server error whose write did land) sends the very same metrics, which MLflow
    stores once, so a round's metrics are never doubled."""
    client = _client(config)
    manifest = manifests[-1]
    now = logged_at_ms
    metrics = [Metric(k, v, now, round_number) for k, v in round_metrics(manifest).items() if math.isfinite(v)]
    federated = manifest.federated_eval_loss
    if federated is not None:  # the clients scored the adapter they received: round − 1's; their word, so labelled
        metrics += [
            Metric("client_stated/federated_loss", federated, now, round_number - 1),
            Metric("client_stated/federated_perplexity", math.exp(federated), now, round_number - 1),
        ]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, to_json(manifest), f"manifests/round-{round_number:04d}.json")
    datasets = round_datasets(manifest)
    if round_number == 0:
        held_out = evaluation_examples(config)
        datasets.append(evaluation_dataset(config, held_out.digest(), len(held_out)))
    if datasets:
        client.log_inputs(run_id, datasets=datasets)
    rounds = [m.round for m in manifests]
    names = sorted({c for m in manifests for c in m.clients})
    sizes = {c: [m.clients[c].bytes_uploaded if c in m.clients else 0 for m in manifests if m.round > 0] for c in names}
    figure = progress_figure(rounds, [m.perplexity for m in manifests], sizes)
    client.log_figure(run_id, figure, "plots/progress.png")


@task(name="track-final-adapter", task_run_name="track-final-adapter-round-{round_number}", cache_policy=NO_CACHE)
def track_final_adapter(config: FederationConfig, run_id: str, adapter: Tensors, round_number: int) -> None:
    """The global adapter in PEFT's own format, so `PeftModel.from_pretrained` loads it as is."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter_folder(config.lora, config.model.source, adapter, Path(tmp))
        client = _client(config)
        client.log_artifacts(run_id, tmp, "adapter")
        client.set_tag(run_id, "fedlib.final_round", str(round_number))


def finish_tracking(config: FederationConfig, run_id: str, status: str) -> None:
    _client(config).set_terminated(run_id, status=status)


@task(name="track-metrics", task_run_name="track-metrics-step-{step}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def track_metrics(config: FederationConfig, run_id: str, metrics: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    _client(config).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(v)])


@task(name="track-split-artifacts", task_run_name="track-split-artifacts", cache_policy=NO_CACHE)
def track_split_artifacts(config: FederationConfig, run_id: str, losses: list[float], parts: dict[str, bytes]) -> None:
    """The training-loss curve, and each side's trained part (LoRA and SPF) as safetensors."""
    client = _client(config)
    client.log_figure(run_id, loss_figure(losses), "plots/split-loss.png")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in parts.items():
            path = f"{tmp}/{name}.safetensors"
            with open(path, "wb") as handle:
                handle.write(data)
            client.log_artifact(run_id, path, "split")
