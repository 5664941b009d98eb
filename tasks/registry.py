"""MLflow's model registry: every round's global adapter is a version of the federation's
registered model, tagged with its lineage; the best one by held-out perplexity carries the
champion alias, chosen only among the versions that are signed rounds' adapters (the registry's
tags are anyone's with registry write; the signed manifests are the aggregator's alone). `export_version` turns a version back into a folder PEFT (or plain
transformers, merged) loads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.model.base import base_revision, load_base_model, load_tokenizer, save_adapter_folder
from fedlib.reports.tables import RegistryEntry, adapter_artifact_path, champion_of, lineage_tags, signed_versions
from fedlib.round.manifest import Manifest
from fedlib.wire.keys import AGGREGATOR
from tasks.credentials import party_keys
from tasks.from_config import Tensors, checkpoint_store


def _client(config: FederationConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def signed_manifests(config: FederationConfig) -> dict[int, Manifest]:
    """The lineage as the aggregator signed it, each manifest verified with the key it trusts."""
    return {m.round: m for m in checkpoint_store(config, party_keys(config, AGGREGATOR)).manifests()}


def versions_by_round(client: MlflowClient, name: str, signed: dict[int, Manifest]) -> dict[int, tuple[str, float]]:
    """round → (version, signed perplexity) of the versions that are signed rounds' adapters."""
    found = client.search_model_versions(f"name = '{name}'")
    return signed_versions((RegistryEntry(v.version, v.tags, v.run_id or "", v.source or "") for v in found), signed)


def registered_rounds(config: FederationConfig) -> set[int]:
    try:
        return set(versions_by_round(_client(config), config.registered_model_name, signed_manifests(config)))
    except MlflowException:
        return set()


def champion_version(config: FederationConfig) -> str | None:
    try:
        return _client(config).get_model_version_by_alias(config.registered_model_name, config.tracking.champion_alias).version
    except MlflowException:
        return None


@task(name="register-round", task_run_name="register-round-{manifest.round}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def register_round(config: FederationConfig, run_id: str, manifest: Manifest, adapter: Tensors) -> str:
    """Registers the round's adapter once (a resumed or retried round finds its version and
    adds none) and moves the champion alias; returns the champion's version."""
    round_number = manifest.round
    run_id = manifest.mlflow_run_id or run_id  # the run the signed manifest names: the version's source is checked against it
    client = _client(config)
    name = config.registered_model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"federation": config.federation.id},
            description=f"Global LoRA adapters of federation {config.federation.id}, one version per round.",
        )
    signed = signed_manifests(config)
    versions = versions_by_round(client, name, signed)
    if round_number not in versions:
        path = adapter_artifact_path(round_number)
        with tempfile.TemporaryDirectory() as tmp:
            save_pyfunc_model(config, adapter, Path(tmp) / "model")
            client.log_artifacts(run_id, str(Path(tmp) / "model"), path)
        tags = lineage_tags(manifest, config.model.source, base_revision(config.model.source))
        created = client.create_model_version(
            name,
            f"runs:/{run_id}/{path}",
            run_id=run_id,
            tags=tags,
            description=f"Round {round_number}: held-out perplexity {manifest.perplexity:.2f}, from {tags['clients'] or 'no clients'}.",
        )
        versions = versions_by_round(client, name, signed)
        if round_number not in versions:  # its tags or source do not match the signed manifest: a bug, not an attack
            raise RuntimeError(f"round {round_number}: version {created.version} does not match the signed manifest")
    # The champion is chosen among signed rounds' adapters only, by their signed perplexity.
    champion = champion_of(versions.values())
    assert champion is not None  # the round just registered is there
    client.set_registered_model_alias(name, config.tracking.champion_alias, champion)
    return champion


PROMPTS = Schema([ColSpec("string")])  # one string per prompt: predict(["..."]) or a one-column frame
ANSWERS = Schema([ColSpec("string")])


def save_pyfunc_model(config: FederationConfig, adapter: Tensors, folder: Path) -> None:
    """The round's adapter as an MLflow pyfunc model (`tasks/pyfunc_adapter.py`) with a
    signature: `mlflow.pyfunc.load_model("models:/<name>@champion").predict(["a prompt"])`
    answers. The PEFT adapter folder sits inside it, under `artifacts/adapter`. Requirements are
    stated, not inferred (inference would import and time every dependency, each round)."""
    import mlflow.pyfunc
    import peft
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter_folder(config.lora, config.model.source, adapter, Path(tmp) / "adapter")
        mlflow.pyfunc.save_model(
            path=str(folder),
            python_model=str(Path(__file__).with_name("pyfunc_adapter.py")),
            artifacts={"adapter": str(Path(tmp) / "adapter")},
            model_config={"source": config.model.source},
            signature=ModelSignature(PROMPTS, ANSWERS, ParamSchema([ParamSpec("max_new_tokens", "long", 48)])),
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
                f"peft=={peft.__version__}",
            ],
        )


def resolve_version(config: FederationConfig, version: str | None) -> ModelVersion:
    """A version number, an alias, or (None) the champion."""
    client = _client(config)
    name = config.registered_model_name
    wanted = version or config.tracking.champion_alias
    try:
        if wanted.isdigit():
            return client.get_model_version(name, wanted)
        return client.get_model_version_by_alias(name, wanted)
    except MlflowException as err:
        raise LookupError(f"registered model {name!r} has no version or alias {wanted!r} (in {config.tracking_uri})") from err


def export_version(config: FederationConfig, version: str | None, out: Path, merge: bool) -> ModelVersion:
    """Writes the version's PEFT adapter folder to `out`, or with `merge` the base model with
    the adapter folded in, plus its tokenizer, as a plain transformers folder."""
    chosen = resolve_version(config, version)
    out.mkdir(parents=True, exist_ok=True)
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        adapter = _adapter_folder(
            Path(mlflow.artifacts.download_artifacts(artifact_uri=chosen.source, dst_path=tmp, tracking_uri=config.tracking_uri))
        )
        if not merge:
            for item in adapter.iterdir():
                shutil.move(str(item), out / item.name)
            return chosen
        merged = PeftModel.from_pretrained(load_base_model(config.model.source), str(adapter)).merge_and_unload()
    merged.config.use_cache = True  # the merged model is for generation as much as scoring
    merged.save_pretrained(str(out))
    load_tokenizer(config.model.source).save_pretrained(str(out))
    return chosen


def _adapter_folder(downloaded: Path) -> Path:
    """The PEFT folder inside a version: under the pyfunc model's `artifacts/adapter`, or the
    version itself (versions registered before the pyfunc model was)."""
    for found in [*sorted(downloaded.glob("artifacts/*/adapter_config.json")), downloaded / "adapter_config.json"]:
        if found.exists():
            return found.parent
    raise LookupError(f"no PEFT adapter in {downloaded}")
