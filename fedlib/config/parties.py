"""The sections of a federation's config that say who takes part and where: each cloud's client,
the parties' keys, orchestration, tracking, the budget and the federation's own settings."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedlib.config.sections import NAME, _Strict, known_protocol_or_unset, known_protocols


class CloudProfile(_Strict):
    """How fast and how dear a cloud's GPUs are: `speed` relative to the other clouds, the
    price of an hour of its compute, the price of a GB leaving it, and `capacity_steps`, the most
    local steps its quota allows in one round."""

    speed: float = Field(1.0, gt=0)
    """Relative speed against the other clouds (step budgets, emulated speeds)."""
    price_per_hour: float = Field(0.0, ge=0)
    """Price of an hour of its compute, for the cost estimate."""
    egress_per_gb: float = Field(0.0, ge=0)
    """Price of a GB leaving the cloud, for the cost estimate."""
    capacity_steps: int | None = Field(None, ge=1)
    """The most local steps its quota allows in one round; unset: no cap."""


class CloudConfig(_Strict):
    """One client: its data and GPUs live in one cloud, and it writes only to that cloud's bucket.
    `key_source` overrides `keyring.key_source` for this client's machine."""

    name: str
    """The client's name: lowercase letters, digits, `-` or `_`, unique (it names storage keys)."""
    provider: Literal["aws", "gcp", "azure", "local"] = "local"
    """`aws`, `gcp`, `azure` or `local`."""
    storage: str | None = None
    """The fsspec URL of the client's own bucket; unset: `file://<data_dir>/clouds/<name>`."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """Non-secret fsspec options (`endpoint_url`, `token: anon`, `config_kwargs`); a key that looks like a credential is
    refused."""
    secret_block: str | None = None
    """A Prefect Secret block whose JSON value adds fsspec options (keys, connection strings)."""
    work_pool: str | None = None
    """The Prefect work pool the client's training runs on."""
    profile: CloudProfile = CloudProfile()
    """Speed, prices and capacity of this cloud (`profile.*` above)."""
    lora_rank: int | None = Field(None, ge=1)
    """A smaller LoRA rank for this cloud, cut from the global adapter and padded back (best with `lora_exact`); unset:
    `lora.r`."""
    key_source: str | None = None
    """Where this client's machine finds its private key; unset: `keyring.key_source`."""
    processes: int = Field(1, ge=1, le=64)
    """Training processes on this client's machine, one per GPU: DDP under accelerate (NCCL on GPUs, gloo on a CPU), one
    update."""
    data: tuple[str, ...] = ()
    """This client's own training files (fsspec URLs or globs), read only by it with its own credentials; set for every cloud
    or none (none: the simulated mode). `.txt`/`.md` are text cut into blocks; `.json`/`.jsonl`/`.parquet`/`.arrow` are
    records (`text`, `prompt`/`completion` or `messages`)."""
    validation: tuple[str, ...] = ()
    """This client's own validation files, scored on each global adapter it receives."""

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (it names storage keys)")
        return value

    _storage = field_validator("storage")(known_protocol_or_unset)
    _files = field_validator("data", "validation")(known_protocols)


class AggregatorKeys(_Strict):
    exchange: str
    """The aggregator's X25519 public key (base64)."""
    signing: str
    """The aggregator's Ed25519 public key (base64)."""


class KeyringConfig(_Strict):
    """Each party's public keys (base64, as `fedlib keys init --party NAME` prints them). Each
    machine holds only its own private key, found through `key_source`: `file:PATH` (`~` is that
    machine's user), `env:VAR`, or `secret:BLOCK` (a Prefect Secret block); `{party}` in it is the
    party's name. Without a `keyring` section one machine plays every party and keeps every key in
    `data_dir/keys` (the embedded default)."""

    aggregator: AggregatorKeys
    """The aggregator's public keys, as `fedlib keys init --party aggregator` prints them."""
    clients: dict[str, str]
    """Each client's X25519 public key (base64), by cloud name."""
    key_source: str = "file:~/.fedlib/keys/{party}.pem"
    """Where a party's machine finds its own private key: `file:PATH`, `env:VAR` or `secret:BLOCK`; `{party}` is the party's
    name."""

    @model_validator(mode="after")
    def _decodable(self) -> KeyringConfig:
        self.publics  # noqa: B018 - raises ValueError naming the key
        return self

    @field_validator("key_source")
    @classmethod
    def _source(cls, value: str) -> str:
        return _key_source(value)

    @property
    def publics(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        from fedlib.wire.keys import PublicKeys, parse_public

        return PublicKeys(
            parse_public(self.aggregator.exchange, X25519PublicKey, "keyring.aggregator.exchange"),
            parse_public(self.aggregator.signing, Ed25519PublicKey, "keyring.aggregator.signing"),
            {c: parse_public(v, X25519PublicKey, f"keyring.clients.{c}") for c, v in self.clients.items()},
        )


def _key_source(value: str) -> str:
    scheme, _, name = value.partition(":")
    if scheme not in ("file", "env", "secret") or not name:
        raise ValueError(f"{value!r}: expected file:PATH, env:VAR or secret:BLOCK")
    return value


class OrchestrationConfig(_Strict):
    """Where client training runs. `local`: tasks in the federation's own process. `deployments`:
    each cloud's `client-training/<cloud>` deployment on that cloud's work pool."""

    dispatch: Literal["local", "deployments"] = "local"
    """`local`: client tasks in the federation's process; `deployments`: each cloud's client deployment on its own work pool."""
    client_deployment: str = "client-training/{cloud}"
    """The deployment each client's round runs as; `{cloud}` is the cloud's name."""
    client_timeout_s: float = Field(3600, gt=0)
    """A dispatched client run still running after this is left out of the round."""
    cancel_grace_s: float = Field(30, gt=0)
    """How long a cancelled client run's worker has to confirm; after it the run is marked Cancelled."""
    upload_retries: int = Field(5, ge=0)
    """Upload task retries, with exponential backoff (1, 2, 4, … s)."""
    round_deadline_s: float | None = Field(None, gt=0)
    """Clients not done training and uploading by then are left out as stragglers (counted, and charged the deadline); a
    deployment run is cancelled."""


class TrackingConfig(_Strict):
    """MLflow backend; the embedded default is SQLite and a local artifact folder in data_dir."""

    uri: str | None = None
    """MLflow tracking URI; unset: SQLite in `data_dir`."""
    experiment: str | None = None
    """MLflow experiment; unset: `fedlib-<federation.id>`."""
    artifact_location: str | None = None
    """Where MLflow stores artifacts; unset: the tracking server's artifact store when `uri` is set,
    else `data_dir/mlartifacts`."""
    registered_model: str | None = None
    """The registered model, one version per round; unset: `fedlib-<federation.id>`."""
    champion_alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$")
    """The alias on the lowest-perplexity version."""
    ui_url: str = "http://127.0.0.1:5000"
    """Where links in Prefect artifacts point to the MLflow UI."""


class BudgetConfig(_Strict):
    """Stop the federation before a round would spend past these (estimated from the last round)."""

    bytes: int | None = Field(None, ge=1)
    """Stop before a round that would pass this many bytes across cloud boundaries, all rounds, at the last round's rate."""
    money: float | None = Field(None, gt=0)
    """Stop before a round that would pass this compute + egress estimate, in the profiles' currency."""


class FederationSettings(_Strict):
    """`clients_per_round` samples that many clients each round (reproducibly from the seed);
    unset, every client takes part every round. `checkpoints` is where the signed global adapters
    and manifests live, an fsspec URL the aggregator writes and every client reads (default: a
    folder in `data_dir`, which only works while every party shares that disk);
    `checkpoint_options` are its fsspec options, without credentials, which each party takes
    from its own environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)."""

    id: str = "demo"
    """Names the storage keys, the checkpoints and the MLflow experiment."""
    data_dir: str = ".fedlib/demo"
    """This party's own state: caches, embedded keys and cloud folders, MLflow database and artifacts (`~` is each party's
    own home)."""
    seed: int = 0
    """Fixes the partition, the initial adapter and each client's batches."""
    clients_per_round: int | None = Field(None, ge=1)
    """Sample this many clients per round, reproducibly from the seed (public, so DP claims no amplification from it); unset:
    all."""
    checkpoints: str | None = None
    """fsspec URL of the signed global adapters and manifests (`s3://`, `gs://`, `az://`, `file://`), under
    `<url>/<id>/round-NNNN/`: the aggregator writes, every client reads. Unset: a folder in `data_dir`."""
    checkpoint_options: dict[str, Any] = Field(default_factory=dict)
    """Its fsspec options, without credentials (each party takes those from its own environment)."""

    _checkpoints = field_validator("checkpoints")(known_protocol_or_unset)

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_'")
        return value
