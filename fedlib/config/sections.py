"""The sections of a federation's config: each a strict pydantic model, checked when it is built."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedlib.codecs import CodecChain
from fedlib.placement import Device, DType, Placement, Quantization, resolve
from fedlib.redaction import redact_text
from fedlib.strategies import make_strategy

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
