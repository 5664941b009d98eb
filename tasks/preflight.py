"""Each party's checks before the first round of a run (`fedlib.round.preflight`): the
aggregator's here, in the federation's process; each client's as a step of its own, run where the
client runs (a task here, or its `client-training` deployment with `step: preflight`), with
only its own credentials. A failure stops the run before any training, naming party and field."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedlib.config import FederationConfig
from fedlib.data.corpus import UndecodableFile, shakespeare_documents, url_documents
from fedlib.round.preflight import PreflightFailed, check_documents, check_files, check_model_source, check_writable
from fedlib.wire.keys import AGGREGATOR
from tasks.credentials import party_keys, storage_options


@task(name="preflight-aggregator", task_run_name="preflight-aggregator", cache_policy=NO_CACHE)
def preflight_aggregator(config: FederationConfig, probe_store: bool) -> None:
    """The aggregator opens its model, its data (in the simulated mode), its held-out set and
    its own key, and with `probe_store` writes a probe to its checkpoint store."""
    _key(config, AGGREGATOR, "keyring.key_source")
    check_references(config)
    if probe_store:
        check_writable(AGGREGATOR, "federation.checkpoints", config.checkpoint_url, config.federation.checkpoint_options)


def check_references(config: FederationConfig) -> None:
    """What the aggregator reads that needs no key and no Prefect: its model source, the data
    it partitions, its held-out set. `fedlib run` checks these before it starts Prefect."""
    check_model_source(AGGREGATOR, config.model.source)
    if config.data.urls:
        check_files(AGGREGATOR, "data.urls", config.data.urls)
    check_files(AGGREGATOR, "evaluation.data", config.evaluation.data)
    if not config.evaluation.data:
        try:
            docs = shakespeare_documents() if config.data.corpus == "shakespeare" else url_documents(config.data.urls)
        except UndecodableFile as err:
            raise PreflightFailed(AGGREGATOR, "data.urls", str(err), "convert it to UTF-8, or narrow the glob to your text files") from None
        if config.evaluation.documents is not None:
            check_documents(AGGREGATOR, config.evaluation.documents, [d.id for d in docs])
        elif config.data.corpus is None and len({d.id for d in docs}) < 2:
            raise PreflightFailed(
                AGGREGATOR, "data.urls", "one document: none can be held out for evaluation", "give more files, or set evaluation.data"
            )


@task(name="preflight-client", task_run_name="preflight-{client}", cache_policy=NO_CACHE)
def preflight_client(config: FederationConfig, client: str, probe_store: bool) -> None:
    """A client opens its model, its own files and its own key, and with `probe_store` writes a
    probe to its own bucket."""
    cloud = config.cloud(client)
    _key(config, client, f"clouds[{client}].key_source" if cloud.key_source else "keyring.key_source")
    check_model_source(client, config.model.source)
    try:
        options = storage_options(config, [client])[client]
    except ValueError as err:
        raise PreflightFailed(
            client, f"clouds[{client}].secret_block", str(err), "create the Secret block on this party's Prefect"
        ) from None
    check_files(client, f"clouds[{client}].data", cloud.data, options)
    check_files(client, f"clouds[{client}].validation", cloud.validation, options)
    if probe_store:
        check_writable(client, f"clouds[{client}].storage", config.storage_url(cloud), options)


def _key(config: FederationConfig, party: str, field: str) -> None:
    try:
        party_keys(config, party)
    except (OSError, KeyError, ValueError) as err:
        fix = "make it with `fedlib keys init`, then `fedlib keys trust`" if config.keyring else "run `fedlib keys init CONFIG`"
        raise PreflightFailed(party, field, f"this party's key cannot be read ({err})", fix) from None
