"""MLflow's model registry: every round's global adapter is a version of the federation's
registered model, tagged with its lineage; the best one by held-out perplexity carries the
champion alias, chosen only among the versions that are signed rounds' adapters (the registry's
tags are anyone's with registry write; the signed manifests are the aggregator's alone). The
files of each version are signed too, before they reach the artifact store, and
`tasks.export`, which turns a version back into a folder PEFT (or plain transformers, merged, or
MLflow) loads, checks them all first: a version edited in the artifact store is refused."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from prefect import task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.model.base import base_revision, load_tokenizer, model_folder
from fedlib.model.pool import POOL
from fedlib.reports.tables import (
    RegistryEntry,
    adapter_artifact_path,
    champion_of,
    model_card,
    signed_versions,
    version_tags,
)
from fedlib.round.checkpoint import CheckpointStore
from fedlib.round.manifest import Manifest
from fedlib.round.registered import RegisteredFiles, file_digests
from fedlib.wire.keys import AGGREGATOR
from tasks.credentials import party_keys
from tasks.from_config import Tensors, checkpoint_store, model_key


def registry_client(config: FederationConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)


def aggregator_store(config: FederationConfig) -> CheckpointStore:
    return checkpoint_store(config, party_keys(config, AGGREGATOR))


def signed_manifests(config: FederationConfig) -> dict[int, Manifest]:
    """The lineage as the aggregator signed it, each manifest verified with the key it trusts."""
    return {m.round: m for m in aggregator_store(config).manifests()}


def versions_by_round(client: MlflowClient, name: str, signed: dict[int, Manifest]) -> dict[int, tuple[str, float]]:
    """round → (version, signed perplexity) of the versions that are signed rounds' adapters."""
    found = client.search_model_versions(f"name = '{name}'")
    return signed_versions((RegistryEntry(v.version, v.tags, v.run_id or "", v.source or "") for v in found), signed)


def registered_rounds(config: FederationConfig) -> set[int]:
    try:
        return set(versions_by_round(registry_client(config), config.registered_model_name, signed_manifests(config)))
    except MlflowException:
        return set()


def champion_version(config: FederationConfig) -> str | None:
    try:
        return registry_client(config).get_model_version_by_alias(config.registered_model_name, config.tracking.champion_alias).version
    except MlflowException:
        return None


@task(name="register-round", task_run_name="register-round-{manifest.round}", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def register_round(config: FederationConfig, run_id: str, manifest: Manifest, adapter: Tensors) -> str:
    """Registers the round's adapter once (a resumed or retried round finds its version and
    adds none) and moves the champion alias; returns the champion's version."""
    round_number = manifest.round
    run_id = manifest.mlflow_run_id or run_id  # the run the signed manifest names: the version's source is checked against it
    client = registry_client(config)
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
            card = model_card(manifest, config.model.source, base_revision(config.model.source), config.registered_model_name)
            save_transformers_model(config, adapter, Path(tmp) / "model", card)
            # Every file of the version, signed before it reaches the artifact store (fedlib.round.registered).
            pinned = RegisteredFiles(config.federation.id, round_number, manifest.adapter_sha256, file_digests(Path(tmp) / "model"))
            aggregator_store(config).commit_registered(pinned)
            client.log_artifacts(run_id, str(Path(tmp) / "model"), path)
        created = client.create_model_version(
            name,
            f"runs:/{run_id}/{path}",
            run_id=run_id,
            tags=version_tags(manifest, base_revision(config.model.source)),
            description=card,
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
EXAMPLE_PROMPT = "Who is the king of Denmark?"


def save_transformers_model(config: FederationConfig, adapter: Tensors, folder: Path, card: str) -> None:
    """The round's adapter as an MLflow transformers-flavour model: PEFT's adapter folder (under
    `peft/`), the tokenizer, and a reference to the base model, which is not copied into every
    version. Loading it runs MLflow's and transformers' own code only: nothing stored in the
    artifact store is executed, and fedlib need not be installed where it loads.

    The base is referenced by the folder it loads from on this machine (`base_model_path`); on
    another machine pass `base_model_path=` to `mlflow.transformers.load_model`, a folder holding
    the same weights (`docs/results.md` says how to make it for the shipped model). Prompts are
    rendered with the tokenizer's chat template (a `{prompt}` template) and answered greedily.
    Requirements are stated, not inferred (inference would import and time every dependency)."""
    import mlflow.transformers
    import peft
    import torch
    import transformers

    tokenizer = load_tokenizer(config.model.source)
    with POOL.lora_model(model_key(config), adapter) as model:
        mlflow.transformers.save_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            path=str(folder),
            task="text-generation",
            base_model_path=str(model_folder(config.model.source)),
            prompt_template=chat_prompt_template(tokenizer),
            model_config={"max_new_tokens": 48, "do_sample": False, "return_full_text": False},
            signature=ModelSignature(PROMPTS, ANSWERS, ParamSchema([ParamSpec("max_new_tokens", "long", 48)])),
            input_example=[EXAMPLE_PROMPT],
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"torch=={torch.__version__.split('+')[0]}",
                f"transformers=={transformers.__version__}",
                f"peft=={peft.__version__}",
            ],
        )
    (folder / "model_card.md").write_text(card)


def chat_prompt_template(tokenizer) -> str | None:
    """The tokenizer's chat template around one user message, as MLflow's `{prompt}` template;
    None for a tokenizer without one (prompts then go in as written)."""
    if not tokenizer.chat_template:
        return None
    marker = "PROMPT-7f3c"  # rendered through the template, then swapped for MLflow's placeholder
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    return text.replace("{", "{{").replace("}", "}}").replace(marker, "{prompt}")
