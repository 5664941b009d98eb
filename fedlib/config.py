"""The one typed description of a federation, validated once at the flow boundary.

Every later stage trusts these objects, so every check that can be made before a model is
loaded is made here, and an error names the file and the dotted field that is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from fedlib.codecs import CodecChain
from fedlib.placement import Device, DType, Placement, Quantization, resolve
from fedlib.redaction import REDACTED, loggable, redact_text, secrets_in
from fedlib.strategies import make_strategy
from fedlib.wire.layout import Layout

NOISE_SEED_ENV = "FEDLIB_ALLOW_NOISE_SEED"

BUILTIN_MODELS = ("smollm2-135m-instruct",)
BUILTIN_CORPORA = ("shakespeare",)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A configuration file that cannot describe a federation; the message names file and field,
    and never a credential of a URL it quotes (the config's own URL included)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """`source` is a shipped model's name, a local Hugging Face model folder, `hf:<repo id>`
    (resolved from the local Hugging Face cache, offline), or the fsspec URL of a model folder in
    the party's own bucket (fetched once into the local cache). Every party must hold the same
    weights: the manifests record the base revision, and a client whose base differs refuses."""

    source: str = "smollm2-135m-instruct"

    @field_validator("source")
    @classmethod
    def _known_or_folder(cls, value: str) -> str:
        if value in BUILTIN_MODELS or (value.startswith("hf:") and "/" in value) or "://" in value:
            return value
        folder = Path(value).expanduser()
        if not (folder / "config.json").is_file():
            raise ValueError(
                f"{value!r} is neither a shipped model ({', '.join(BUILTIN_MODELS)}), a local Hugging Face model "
                "folder with a config.json, hf:<repo id>, nor a model folder's URL"
            )
        return str(folder.resolve())


class DataConfig(_Strict):
    """Text to train on: the shipped plays, or the user's own .txt/.jsonl files by fsspec URL."""

    corpus: str | None = "shakespeare"
    urls: tuple[str, ...] = ()
    seq_len: int = Field(128, ge=8, le=4096)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.urls and self.corpus is not None:
            raise ValueError("give either 'corpus' or 'urls', not both (set corpus: null)")
        if not self.urls and self.corpus is None:
            raise ValueError("no data: set 'corpus' or 'urls'")
        if self.corpus is not None and self.corpus not in BUILTIN_CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; shipped: {', '.join(BUILTIN_CORPORA)}")
        return self


class PartitionConfig(_Strict):
    """How training blocks are split over clients; `by` picks the label Dirichlet skews over."""

    kind: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0)
    by: Literal["group", "document"] = "group"


class EvaluationConfig(_Strict):
    """The aggregator's held-out set, scored after every round: `data` (fsspec URLs it owns) or,
    without it, the corpus's `documents`, which no client trains on. Each client also scores the
    global adapter it receives on its own validation split (`clouds[].validation`, or in the
    simulated mode up to `client_blocks` held-out blocks the aggregator does not use), and
    reports loss and token count in its sealed update."""

    documents: tuple[str, ...] = ("macbeth",)
    data: tuple[str, ...] = ()
    max_blocks: int = Field(16, ge=1)
    client_blocks: int = Field(8, ge=0)
    batch_size: int = Field(8, ge=1)


class LoraSettings(_Strict):
    """`freeze_a` is FFA-LoRA (Sun et al., 2024): every A stays at its seeded initial value, so
    only the B matrices are trained, sent and averaged, and their average is the exact average
    of the clients' products B·A (A being shared). Half the bytes, or less, each way."""

    r: int = Field(8, ge=1, le=1024)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    freeze_a: bool = False


class TrainingConfig(_Strict):
    """Local training, run by transformers' `Trainer` (see `fedlib.model.training`). `batch_size` is
    examples per optimizer step, over all of a client's processes and accumulated micro-batches.
    `device`, `dtype` and `quantization` (QLoRA: `4bit`/`8bit`, CUDA only) are resolved on each
    party's own machine (`fedlib.placement`). `step_budget: deadline` gives each cloud as many
    local steps as its speed fits into `orchestration.round_deadline_s` (capped by its
    `capacity_steps`), from `seconds_per_step` at speed 1, or from what the last round measured.
    `emulate_speed` makes one machine play clouds of different speeds by pausing slower clients
    after each step (benchmarks only)."""

    rounds: int = Field(3, ge=1)
    local_steps: int = Field(10, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    torch_threads: int | None = Field(None, ge=1)
    step_budget: Literal["equal", "deadline"] = "equal"
    seconds_per_step: float | None = Field(None, gt=0)
    emulate_speed: bool = False
    device: Device = "auto"
    dtype: DType = "auto"
    quantization: Quantization = "none"
    gradient_checkpointing: bool = False
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(None, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _placeable(self) -> TrainingConfig:
        self.placement  # noqa: B018 - raises ValueError naming the field this machine cannot honour
        return self

    @property
    def placement(self) -> Placement:
        """Where the base model lives on this machine (see `fedlib.placement`); every party
        resolves it for itself, so `auto` means each machine's own GPU or CPU."""
        return resolve(self.device, self.dtype, self.quantization)


class AggregationConfig(_Strict):
    """`strategy` names a registered strategy; `options` are its keyword arguments (e.g.
    `server_lr` for fedadam, `mu` for fedprox, `byzantine` for krum). `normalize_steps` divides
    each delta by its local steps before averaging (FedNova), for clouds that run unequal steps.
    `max_examples` caps the example count a client may claim (FedAvg's weight); where the
    aggregator knows a client's shard, the shard's size is the cap. `max_weight_share` bounds the
    share of the round's weight any one client holds, whatever it claims (`fedlib.strategies.shares`)."""

    strategy: str = "fedavg"
    options: dict[str, Any] = Field(default_factory=dict)
    normalize_steps: bool = False
    min_clients: int = Field(1, ge=1)
    max_update_bytes: int | None = Field(None, ge=1024)  # default: from the adapter's size (fedlib.round.aggregator.update_limit)
    max_examples: int = Field(10**9, ge=1, le=2**53)
    max_weight_share: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _known(self) -> AggregationConfig:
        try:
            strategy = make_strategy(self.strategy, self.options)
        except KeyError as err:
            raise ValueError(f"strategy: {err.args[0]}") from None
        except ValueError as err:
            raise ValueError(f"options: {err}") from None
        if self.normalize_steps and not strategy.from_mean_only:
            raise ValueError(f"normalize_steps: {self.strategy!r} does not aggregate a mean")
        return self

    @property
    def from_mean_only(self) -> bool:
        return make_strategy(self.strategy, self.options).from_mean_only


class CloudProfile(_Strict):
    """How fast and how dear a cloud's GPUs are: `speed` relative to the other clouds, the
    price of an hour of its compute, the price of a GB leaving it, and `capacity_steps`, the most
    local steps its quota allows in one round."""

    speed: float = Field(1.0, gt=0)
    price_per_hour: float = Field(0.0, ge=0)
    egress_per_gb: float = Field(0.0, ge=0)
    capacity_steps: int | None = Field(None, ge=1)


class CloudConfig(_Strict):
    """One client: its data and GPUs live in one cloud, and it writes only to that cloud's bucket.
    `key_source` overrides `keyring.key_source` for this client's machine."""

    name: str
    provider: Literal["aws", "gcp", "azure", "local"] = "local"
    storage: str | None = None
    storage_options: dict[str, Any] = Field(default_factory=dict)
    secret_block: str | None = None
    work_pool: str | None = None
    profile: CloudProfile = CloudProfile()
    lora_rank: int | None = Field(None, ge=1)  # a smaller LoRA rank for this cloud's clients (see fedlib.model.ranks)
    key_source: str | None = None
    processes: int = Field(1, ge=1, le=64)  # training processes on this client's machine (one per GPU; DDP)
    data: tuple[str, ...] = ()  # this client's own training files (fsspec URLs or globs); only it opens them
    validation: tuple[str, ...] = ()  # and its own validation files, scored on each global adapter it receives

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_' (it names storage keys)")
        return value


class AggregatorKeys(_Strict):
    exchange: str
    signing: str


class KeyringConfig(_Strict):
    """Each party's public keys (base64, as `fedlib keys init --party NAME` prints them). Each
    machine holds only its own private key, found through `key_source`: `file:PATH` (`~` is that
    machine's user), `env:VAR`, or `secret:BLOCK` (a Prefect Secret block); `{party}` in it is the
    party's name. Without a `keyring` section one machine plays every party and keeps every key in
    `data_dir/keys` (the embedded default)."""

    aggregator: AggregatorKeys
    clients: dict[str, str]
    key_source: str = "file:~/.fedlib/keys/{party}.pem"

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


class PrivacyConfig(_Strict):
    """Client-level DP-FedAvg. `noise_seed` fixes the noise for tests only: noise that anyone can
    regenerate can be subtracted again, so it is refused unless the environment says this is a
    test (`FEDLIB_ALLOW_NOISE_SEED=1`), and it is never logged (see `fedlib.redaction`)."""

    enabled: bool = False
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)
    noise_seed: int | None = None

    @field_validator("noise_seed")
    @classmethod
    def _tests_only(cls, value: int | None) -> int | None:
        if value is not None and os.environ.get(NOISE_SEED_ENV) != "1":
            raise ValueError(f"a fixed noise seed makes the noise removable; it is for tests only ({NOISE_SEED_ENV}=1)")
        return value


class CompressionConfig(_Strict):
    """Codecs applied to every update inside the envelope, in order (see `fedlib.codecs`):
    fp16 | bf16 | int8 | int4 | int2 | sign | sign-proj | topk, then optionally zstd. `error_feedback` carries what a lossy chain
    dropped into the client's next update."""

    codecs: tuple[str, ...] = ()
    topk_fraction: float = Field(0.01, gt=0, le=1)
    zstd_level: int = Field(3, ge=1, le=22)
    error_feedback: bool = True
    broadcast: tuple[str, ...] = ()  # codecs for the global adapter's change, sent down (`fedlib.round.broadcast`)

    @model_validator(mode="after")
    def _valid_chain(self) -> CompressionConfig:
        self.chain  # noqa: B018 - raises ValueError naming the problem
        try:
            self.broadcast_chain  # noqa: B018
        except ValueError as err:
            raise ValueError(f"compression.broadcast: {err}") from None
        return self

    @property
    def chain(self) -> CodecChain:
        return CodecChain(tuple(self.codecs), self.topk_fraction, self.zstd_level)

    @property
    def broadcast_chain(self) -> CodecChain:
        return CodecChain(tuple(self.broadcast), self.topk_fraction, self.zstd_level)


class SplitConfig(_Strict):
    """Split fine-tuning (`flows/split_finetune.py`): the client keeps the embeddings, the first
    `cut` blocks and the LM head; a server process holds the other blocks. LoRA (`lora:`) goes
    on both sides; SPF trains the top `spf_fraction` of `spf_modules`' weights by calibrated
    gradient magnitude. `require_tee` refuses a server unless `attestation_verifier` (a
    registered verifier, see `fedlib.split.attestation`) accepts its evidence for this session.
    The server holds at most `max_sessions` sessions, drops one idle for `session_ttl_s`, and
    refuses a request body over `max_body_bytes`."""

    cut: int = Field(2, ge=0)
    rounds: int = Field(1, ge=1)
    steps: int = Field(20, ge=1)
    batch_size: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    spf_modules: tuple[str, ...] = ("down_proj",)
    spf_fraction: float = Field(0.001, gt=0, le=1)
    calibration_batches: int = Field(2, ge=1)
    require_tee: bool = False
    attestation_verifier: str | None = None
    server_timeout_s: float = Field(300, gt=0)
    max_sessions: int = Field(16, ge=1)
    session_ttl_s: float = Field(900, gt=0)
    max_body_bytes: int = Field(64 * 2**20, ge=1024)


class SecureAggregationConfig(_Strict):
    """Pairwise masking so that the aggregator learns only the sum of the updates. `threshold`
    reveals are needed to remove the masks (default: a majority of the clients, at least 2);
    `frac_bits` is the fixed-point precision (2^-frac_bits), traded against the largest entry a
    client's update may hold: 2^(31 - frac_bits) / clients (at 24 bits and 3 clients, 42).
    With `bits`, updates are sent instead as stochastically rounded codes of that many bits,
    masked in a ring just large enough for their sum (3 bits per entry for 2-bit codes and 3
    clients, against 32)."""

    enabled: bool = False
    threshold: int | None = Field(None, ge=2)
    frac_bits: int = Field(24, ge=4, le=28)
    bits: int | None = Field(None, ge=2, le=8)  # low-bit codes in a small ring (`fedlib.secagg.quantised`) instead of fixed point


class OrchestrationConfig(_Strict):
    """Where client training runs. `local`: tasks in the federation's own process. `deployments`:
    each cloud's `client-training/<cloud>` deployment on that cloud's work pool."""

    dispatch: Literal["local", "deployments"] = "local"
    client_deployment: str = "client-training/{cloud}"
    client_timeout_s: float = Field(3600, gt=0)
    cancel_grace_s: float = Field(30, gt=0)  # how long a cancelled client run's worker has to confirm
    upload_retries: int = Field(5, ge=0)
    round_deadline_s: float | None = Field(None, gt=0)  # clients not done by then are left out as stragglers


class TrackingConfig(_Strict):
    """MLflow backend; the embedded default is SQLite and a local artifact folder in data_dir."""

    uri: str | None = None
    experiment: str | None = None
    artifact_location: str | None = None
    registered_model: str | None = None  # one version per round; default fedlib-<federation id>
    champion_alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_-]*$")  # on the lowest-perplexity version
    ui_url: str = "http://127.0.0.1:5000"  # where links in Prefect artifacts point to the MLflow UI


class BudgetConfig(_Strict):
    """Stop the federation before a round would spend past these (estimated from the last round)."""

    bytes: int | None = Field(None, ge=1)  # bytes across cloud boundaries, all rounds
    money: float | None = Field(None, gt=0)  # compute + egress, in the profiles' currency


class FederationSettings(_Strict):
    """`clients_per_round` samples that many clients each round (reproducibly from the seed);
    unset, every client takes part every round. `checkpoints` is where the signed global adapters
    and manifests live, an fsspec URL the aggregator writes and every client reads (default: a
    folder in `data_dir`, which only works while every party shares that disk);
    `checkpoint_options` are its fsspec options, without credentials, which each party takes
    from its own environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*)."""

    id: str = "demo"
    data_dir: str = ".fedlib/demo"
    seed: int = 0
    clients_per_round: int | None = Field(None, ge=1)
    checkpoints: str | None = None
    checkpoint_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits, '-' or '_'")
        return value


class FederationConfig(_Strict):
    """The whole federation. No credential may appear anywhere in it (a password in a URL, a
    key that looks like a secret): everything here may end up in MLflow params, Prefect
    parameters and manifests, and its JSON form is passed through `fedlib.redaction.loggable`
    on the way out (which also hides the test-only noise seed)."""

    federation: FederationSettings = FederationSettings()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    lora: LoraSettings = LoraSettings()
    training: TrainingConfig = TrainingConfig()
    aggregation: AggregationConfig = AggregationConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    secure_aggregation: SecureAggregationConfig = SecureAggregationConfig()
    compression: CompressionConfig = CompressionConfig()
    budget: BudgetConfig = BudgetConfig()
    split: SplitConfig = SplitConfig()
    keyring: KeyringConfig | None = None
    clouds: tuple[CloudConfig, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, raw: Any) -> Any:
        found = secrets_in(raw) if isinstance(raw, dict) else []
        if found:
            where, what = found[0]
            raise ValueError(
                f"{where}: {what}: credentials belong in a Prefect Secret block (clouds[].secret_block) or the "
                "provider's environment variables (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, AZURE_STORAGE_*, MLFLOW_TRACKING_PASSWORD)"
            )
        return raw

    @model_serializer(mode="wrap", when_used="json")
    def _loggable(self, handler):
        return loggable(handler(self))

    @model_validator(mode="after")
    def _consistent(self) -> FederationConfig:
        names = [c.name for c in self.clouds]
        if len(set(names)) != len(names):
            raise ValueError(f"clouds: names must be unique, got {names}")
        if self.aggregation.min_clients > len(self.clouds):
            raise ValueError(f"aggregation.min_clients={self.aggregation.min_clients} exceeds the {len(self.clouds)} configured clouds")
        for cloud in self.clouds:
            parts = cloud.processes * self.training.gradient_accumulation_steps
            if self.training.batch_size % parts:
                raise ValueError(
                    f"training.batch_size={self.training.batch_size} is not divisible by clouds[{cloud.name}].processes × "
                    f"training.gradient_accumulation_steps = {parts} (it is the batch of one optimizer step)"
                )
        with_data = [c.name for c in self.clouds if c.data]
        if with_data and len(with_data) != len(names):
            raise ValueError(
                f"clouds[].data: set for {with_data} only; either every client names its own data, or none does "
                "(the simulated mode, where the corpus is partitioned and each shard sent to its client)"
            )
        if self.keyring is not None and set(self.keyring.clients) != set(names):
            raise ValueError(f"keyring.clients: lists {sorted(self.keyring.clients)}, the clouds are {sorted(names)}")
        for cloud in self.clouds:
            if cloud.key_source is not None:
                _key_source(cloud.key_source)
            if cloud.lora_rank is not None and cloud.lora_rank > self.lora.r:
                raise ValueError(f"clouds[{cloud.name}].lora_rank={cloud.lora_rank} exceeds lora.r={self.lora.r}, the global rank")
        if self.lora.freeze_a and any(c.lora_rank is not None for c in self.clouds):
            raise ValueError("lora.freeze_a: not with clouds[].lora_rank (a cut rank would drop frozen directions of A)")
        if self.lora.freeze_a and self.aggregation.strategy == "lora_exact":
            raise ValueError("lora.freeze_a: averaging B is already exact when A is shared; use fedavg, not lora_exact")
        per_round = self.federation.clients_per_round
        if per_round is not None and not self.aggregation.min_clients <= per_round <= len(self.clouds):
            raise ValueError(
                f"federation.clients_per_round={per_round} must be between aggregation.min_clients="
                f"{self.aggregation.min_clients} and the {len(self.clouds)} configured clouds"
            )
        if self.training.step_budget == "deadline" and self.orchestration.round_deadline_s is None:
            raise ValueError("training.step_budget=deadline needs orchestration.round_deadline_s")
        secure = self.secure_aggregation
        if secure.enabled:
            if len(self.clouds) < 2:
                raise ValueError("secure_aggregation.enabled: needs at least 2 clouds (the sum of one is that one)")
            if secure.threshold is not None and secure.threshold > len(self.clouds):
                raise ValueError(f"secure_aggregation.threshold={secure.threshold} exceeds the {len(self.clouds)} configured clouds")
            if secure.threshold is not None and 2 * secure.threshold <= len(self.clouds):
                raise ValueError(
                    f"secure_aggregation.threshold={secure.threshold} must be more than half of the {len(self.clouds)} clouds: "
                    "two disjoint sets of clients below a majority could each rebuild another client's masks"
                )
            if per_round is not None and per_round < self.secagg_min_survivors:
                raise ValueError(
                    f"federation.clients_per_round={per_round}: a secure round needs {self.secagg_min_survivors} survivors "
                    "(aggregation.min_clients, secure_aggregation.threshold)"
                )
            if self.compression.codecs:
                raise ValueError(
                    "compression.codecs: masked updates are uniform noise, which no codec can shrink; "
                    "leave codecs empty with secure aggregation (secure_aggregation.bits codes them before masking)"
                )
            if secure.bits is not None and self.privacy.enabled:
                raise ValueError(
                    "secure_aggregation.bits: not with privacy.enabled (the code scale bounds a training "
                    "change, not the Gaussian noise added to it)"
                )
            if not self.aggregation.from_mean_only:
                raise ValueError(
                    f"aggregation.strategy={self.aggregation.strategy!r} needs each update, but secure aggregation "
                    "reveals only their sum; use a mean-based strategy (fedavg, fedprox, fedavgm, fedadam, ...)"
                )
        if self.privacy.enabled and self.aggregation.normalize_steps:
            raise ValueError("aggregation.normalize_steps: not with privacy.enabled (clipping already bounds every update)")
        if self.privacy.enabled and not self.aggregation.from_mean_only:
            raise ValueError(f"privacy.enabled: DP-FedAvg adds noise to a mean, and {self.aggregation.strategy!r} does not aggregate one")
        return self

    @property
    def lossy_updates(self) -> bool:
        """Whether what a client sends loses part of its update (what error feedback carries)."""
        secure = self.secure_aggregation
        return self.compression.chain.lossy or (secure.enabled and secure.bits is not None)

    @property
    def proximal_mu(self) -> float:
        """FedProx's μ for the clients' training (0 for every other strategy)."""
        from fedlib.strategies.fedavg import FedProx

        strategy = make_strategy(self.aggregation.strategy, self.aggregation.options)
        return strategy.mu if isinstance(strategy, FedProx) else 0.0

    @property
    def secagg_threshold(self) -> int:
        return self.secure_aggregation.threshold or max(2, len(self.clouds) // 2 + 1)

    @property
    def secagg_min_survivors(self) -> int:
        """The fewest clients a secure round can complete with: its masks need `threshold` reveals."""
        return max(self.aggregation.min_clients, self.secagg_threshold)

    @property
    def simulated(self) -> bool:
        """One corpus partitioned by the aggregator (no client names its own data)."""
        return not self.clouds[0].data

    @property
    def data_path(self) -> Path:
        return Path(self.federation.data_dir).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.data_path / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or f"fedlib-{self.federation.id}"

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"fedlib-{self.federation.id}"

    @property
    def artifact_location(self) -> str:
        return self.tracking.artifact_location or (self.data_path / "mlartifacts").as_uri()

    @property
    def checkpoint_url(self) -> str:
        """This federation's checkpoint folder: `<federation.checkpoints>/<id>`."""
        if self.federation.checkpoints:
            return f"{self.federation.checkpoints.rstrip('/')}/{self.federation.id}"
        return (self.data_path / "checkpoints" / self.federation.id).as_uri()

    def storage_url(self, cloud: CloudConfig) -> str:
        """Where a cloud's client writes; the embedded default is a local folder per cloud."""
        if cloud.storage:
            return cloud.storage.rstrip("/")
        return (self.data_path / "clouds" / cloud.name).as_uri()

    @property
    def layout(self) -> Layout:
        """Where this federation's objects live in each client's bucket (`fedlib.wire.layout`)."""
        return Layout(self.federation.id, {cloud.name: self.storage_url(cloud) for cloud in self.clouds})

    def cloud(self, name: str) -> CloudConfig:
        for cloud in self.clouds:
            if cloud.name == name:
                return cloud
        raise KeyError(f"no cloud named {name!r} in the configuration")


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else ("." if parts else "") + str(item))
    return "".join(parts)


def _describe(source: str, loc: tuple[int | str, ...], msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    # Cross-field checks run on the whole model and start their message with the field they name.
    return f"{source}: {msg}" if not loc else f"{source}: {_field_path(loc)}: {msg}"


def parse_config(raw: object, source: str = "<config>") -> FederationConfig:
    """Validate an already-parsed mapping; `source` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return FederationConfig.model_validate(raw)
    except ValidationError as err:
        lines = [_describe(source, e["loc"], e["msg"]) for e in err.errors()]
        raise ConfigError("invalid configuration\n  " + "\n  ".join(lines)) from None


def load_config(path: str | Path) -> FederationConfig:
    """Read and validate a YAML config, from a file or an fsspec URL (read with this machine's
    own credentials); every error message starts with where it came from."""
    if isinstance(path, str) and "://" in path:
        import fsspec

        try:
            with fsspec.open(path, "rb") as handle:
                data = handle.read(MAX_CONFIG_BYTES + 1)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: cannot read configuration ({err})") from None
        return _parse_yaml(data, path)
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read configuration ({err.strerror})") from None
    return _parse_yaml(data, str(path))


def config_from(value: FederationConfig | dict | str | Path, source: str = "<parameter>") -> FederationConfig:
    """A deployment's `config` parameter: the validated config as data (what the federation
    passes its clients), or the path or fsspec URL of a YAML file. The test-only noise seed
    arrives redacted (`fedlib.redaction`) and is dropped: it never travels."""
    if isinstance(value, FederationConfig):
        return value
    if isinstance(value, dict):
        privacy = value.get("privacy")
        if isinstance(privacy, dict) and privacy.get("noise_seed") == REDACTED:
            value = {**value, "privacy": {k: v for k, v in privacy.items() if k != "noise_seed"}}
        return parse_config(value, source)
    return load_config(value)


# A config is a page of settings. Bounds that no real one comes near keep a hostile file (from a
# config URL, or a run's parameter) from costing the aggregator more than it costs to write.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32


class _ConfigShapeError(yaml.YAMLError):
    pass


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses aliases and counts nodes and depth while it composes.

    Aliases are where a 500-byte file becomes 10^9 leaves (each `*x` repeats a whole subtree
    without costing a byte), so none are accepted; a config has nothing to share that a few more
    lines cannot write out. Counting while composing stops a file before it is built."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _ConfigShapeError(
                f"line {mark.line + 1}: YAML aliases (*name, <<: *name) are not accepted in a config; write the value out where it is used"
            )
        self._nodes += 1
        if self._nodes > MAX_CONFIG_NODES:
            raise _ConfigShapeError(f"more than {MAX_CONFIG_NODES:,} values; a config is far smaller")
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _ConfigShapeError(f"nested deeper than {MAX_CONFIG_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _parse_yaml(data: bytes | str, path: str) -> FederationConfig:
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a page of settings")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    loader = _BoundedLoader(text)
    try:
        raw = loader.get_single_data()
    except _ConfigShapeError as err:
        raise ConfigError(f"{path}: refused: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    return parse_config(raw, path)
