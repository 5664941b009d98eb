"""The sections of a federation's config that say what is learned and how: model, data, partition,
evaluation, LoRA, training, aggregation, privacy, compression, secure aggregation, split. Each is
a strict pydantic model, checked when it is built; each field's docstring is its entry in the
configuration reference (`docs/hooks/config_reference.py` generates the page from them).
Who takes part and where is `fedlib.config.parties`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import fsspec
from fsspec.core import split_protocol
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fedlib.codecs import CodecChain
from fedlib.placement import Device, DType, Placement, Quantization, resolve
from fedlib.redaction import redact_text
from fedlib.strategies import make_strategy

NOISE_SEED_ENV = "FEDLIB_ALLOW_NOISE_SEED"

BUILTIN_MODELS = ("smollm2-135m-instruct",)
BUILTIN_CORPORA = ("shakespeare",)
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class ConfigError(ValueError):
    """A configuration file that cannot describe a federation; the message names file and field,
    and never a credential of a URL it quotes (the config's own URL included)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_text(message))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def known_protocol(value: str) -> str:
    """A URL fsspec can open, or a local path: an unknown protocol (`s4://`) is refused when the
    config is read, not when a party first opens it mid-round."""
    for part in value.split("::"):
        protocol = split_protocol(part)[0]
        if protocol is not None and protocol not in fsspec.available_protocols():
            raise ValueError(f"{value!r}: unknown storage protocol {protocol!r}; use s3://, gs://, az://, file:// or a local path")
    return value


def known_protocol_or_unset(value: str | None) -> str | None:
    return value if value is None else known_protocol(value)


def known_protocols(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(known_protocol(v) for v in values)


class ModelConfig(_Strict):
    """`source` is a shipped model's name, a local Hugging Face model folder, `hf:<repo id>`
    (resolved from the local Hugging Face cache, offline), or the fsspec URL of a model folder in
    the party's own bucket (fetched once into the local cache). Every party must hold the same
    weights: the manifests record the base revision, and a client whose base differs refuses."""

    source: str = "smollm2-135m-instruct"
    """A shipped model's name, a local Hugging Face causal-LM folder, `hf:<repo id>` from the local Hugging Face cache
    (offline), or the fsspec URL of a model folder in the party's own bucket (fetched once into the cache). The manifests
    record its revision; a client whose base differs refuses to train."""

    @field_validator("source")
    @classmethod
    def _known_or_folder(cls, value: str) -> str:
        if value in BUILTIN_MODELS or (value.startswith("hf:") and "/" in value):
            return value
        if "://" in value:
            return known_protocol(value)
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
    """The shipped plays (the group is the genre); `null` when `urls` names your own files."""
    urls: tuple[str, ...] = ()
    """Your own `.txt`/`.md` (one document per file; the group is the parent folder) or `.jsonl` (`text`, optional `id`,
    `group`/`source`) files, as fsspec URLs or globs."""
    seq_len: int = Field(128, ge=8, le=4096)
    """Tokens per training and evaluation block; an instruction record is padded to it (attention-masked), a longer one cut."""

    _urls = field_validator("urls")(known_protocols)

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
    """`iid`, or `dirichlet` with concentration `alpha` over the label `by` names."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration: smaller is more skewed."""
    by: Literal["group", "document"] = "group"
    """The label Dirichlet skews over: each block's `group` or its `document`."""


class EvaluationConfig(_Strict):
    """The aggregator's held-out set, scored after every round: `data` (fsspec URLs it owns) or,
    without it, the corpus's `documents`, which no client trains on. Each client also scores the
    global adapter it receives on its own validation split (`clouds[].validation`, or in the
    simulated mode up to `client_blocks` held-out blocks the aggregator does not use), and
    reports loss and token count in its sealed update."""

    documents: tuple[str, ...] | None = None
    """Documents held out from every client and scored each round, by name: a `.txt`/`.md` file's name without its
    extension, a `.jsonl` record's `id` (else `<file name>-<line>`). Unset: `macbeth` for the shipped corpus; for your own
    `data.urls`, a seeded `held_out_share` of the documents."""
    held_out_share: float = Field(0.1, gt=0, lt=1)
    """With your own `data.urls` and no `documents` named: the share of documents held out (at least one), drawn from
    `federation.seed`; the names are logged."""
    data: tuple[str, ...] = ()
    """The aggregator's own held-out files (fsspec URLs; text, or instruction records scored on the answers only); empty: the
    corpus's `documents`."""
    max_blocks: int = Field(16, ge=1)
    """Blocks in the held-out set."""
    client_blocks: int = Field(8, ge=0)
    """Simulated mode: each client's validation split, dealt from held-out blocks the aggregator does not score; each client
    scores the adapter it receives on it (MLflow `eval/federated_perplexity`)."""
    batch_size: int = Field(8, ge=1)
    """Examples per evaluation batch."""

    _data = field_validator("data")(known_protocols)


class LoraSettings(_Strict):
    """`freeze_a` is FFA-LoRA (Sun et al., 2024): every A stays at its seeded initial value, so
    only the B matrices are trained, sent and averaged, and their average is the exact average
    of the clients' products B·A (A being shared). Half the bytes, or less, each way."""

    r: int = Field(8, ge=1, le=1024)
    """LoRA rank (PEFT `LoraConfig.r`): the federation's global rank."""
    alpha: int = Field(16, ge=1)
    """LoRA scaling (PEFT `lora_alpha`)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout (PEFT `lora_dropout`)."""
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """The modules LoRA adapts (PEFT `target_modules`)."""
    freeze_a: bool = False
    """FFA-LoRA: every A stays at its seeded start; only the B matrices are trained, sent and averaged (exactly)."""


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
    """Rounds per run."""
    local_steps: int = Field(10, ge=1)
    """Each client's optimizer steps per round (transformers' `Trainer`, AdamW)."""
    batch_size: int = Field(4, ge=1)
    """Examples per optimizer step, over all of a client's processes and accumulated micro-batches."""
    learning_rate: float = Field(1e-3, gt=0)
    """The clients' learning rate."""
    torch_threads: int | None = Field(None, ge=1)
    """CPU threads torch uses in this process (unset: torch's default); clients training at once in it share them."""
    step_budget: Literal["equal", "deadline"] = "equal"
    """`deadline`: each cloud runs the steps its speed fits into 75% of `orchestration.round_deadline_s`; a cloud slower than
    its profile last round is held to its own timing, and one that straggled gets half its steps."""
    seconds_per_step: float | None = Field(None, gt=0)
    """Seconds per local step at speed 1, for step budgets and emulated speeds; unset: the last round's median."""
    emulate_speed: bool = False
    """One machine plays clouds of different `profile.speed` by pausing after each step (benchmarks and tests)."""
    device: Device = "auto"
    """`auto`, `cuda`, `mps` or `cpu`, resolved on each party's own machine."""
    dtype: DType = "auto"
    """`auto` (bf16 where the GPU has it, else fp32), `bf16`, `fp16` (GPU only) or `fp32`: the base model's dtype, trained
    under autocast; LoRA weights and updates stay fp32."""
    quantization: Quantization = "none"
    """`4bit` / `8bit`: QLoRA through bitsandbytes and peft's `prepare_model_for_kbit_training`; CUDA only, refused when the
    config is read on a machine without it."""
    gradient_checkpointing: bool = False
    """As in `TrainingArguments`."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """As in `TrainingArguments`; `batch_size` must divide by processes × accumulation steps."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Gradient clipping, as in `TrainingArguments`; unset clips nothing."""
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    """`constant`, `constant_with_warmup`, `linear` or `cosine`, over each round's local steps."""
    warmup_steps: int = Field(0, ge=0)
    """Warm-up steps of the scheduler."""

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
    """A registered strategy: `fedavg`, `fedprox`, `fedavgm`, `fedadam`, `fedyogi`, `fedadagrad`, `median`, `trimmed_mean`,
    `krum`, `lora_exact`."""
    options: dict[str, Any] = Field(default_factory=dict)
    """The strategy's arguments: `mu` (fedprox); `server_lr`, `momentum` (fedavgm); `server_lr`, `beta1`, `beta2`, `tau`
    (fedadam/yogi/adagrad); `trim` (trimmed_mean); `byzantine`, `select` (krum)."""
    normalize_steps: bool = False
    """Divide each delta by its local steps before averaging (FedNova), for unequal step budgets."""
    min_clients: int = Field(1, ge=1)
    """Quorum: fewer accepted updates fail the round, with the reasons."""
    max_update_bytes: int | None = Field(None, ge=1024)
    """Larger objects are rejected, read with a ranged read of this + 1 bytes; unset: 2 × the adapter's fp32 size + 1 MiB."""
    max_examples: int = Field(10**9, ge=1, le=2**53)
    """The most examples a client may claim (FedAvg's weight); a client's shard size caps it further where the aggregator
    knows it."""
    max_weight_share: float = Field(0.5, gt=0, le=1)
    """The largest share of the round's weight one client's claimed example count may give it; a larger claim is lowered to
    the bound (counts of shards the aggregator dealt itself stand)."""

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


class PrivacyConfig(_Strict):
    """Client-level DP-FedAvg. `noise_seed` fixes the noise for tests only: noise that anyone can
    regenerate can be subtracted again, so it is refused unless the environment says this is a
    test (`FEDLIB_ALLOW_NOISE_SEED=1`), and it is never logged (see `fedlib.redaction`)."""

    enabled: bool = False
    """Client-level DP-FedAvg: clip each update, add Gaussian noise to the mean, account ε."""
    clip_norm: float = Field(1.0, gt=0)
    """Each client's update is clipped to this L2 norm."""
    noise_multiplier: float = Field(1.0, ge=0)
    """Noise standard deviation, in units of `clip_norm`."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """The δ of the (ε, δ) guarantee the accountant reports."""
    epsilon_budget: float | None = Field(None, gt=0)
    """Stop before a round would spend past this ε; unset: no stop."""
    noise_seed: int | None = None
    """Tests only (`FEDLIB_ALLOW_NOISE_SEED=1`): fixes the noise, which makes it removable. Never logged."""

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
    """Update codecs in order, by name (`fedlib/codecs/`): `fp16`, `bf16`, `int8`, `int4`, `int2`, `sign`, `sign-proj`,
    `topk`, then optionally `zstd`."""
    topk_fraction: float = Field(0.01, gt=0, le=1)
    """Density kept by `topk`."""
    zstd_level: int = Field(3, ge=1, le=22)
    """zstd's compression level."""
    error_feedback: bool = True
    """Clients carry what a lossy chain dropped into their next update."""
    broadcast: tuple[str, ...] = ()
    """Codecs for the global adapter's change sent down: a client keeps the last global sealed in its own bucket and
    downloads only the change, which the aggregator commits exactly as clients decode it."""

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


class TcbMinimum(_Strict):
    """The oldest SEV-SNP firmware accepted: security patch levels (SPLs), each 0..255."""

    bootloader: int = Field(0, ge=0, le=255)
    """Boot loader SPL."""
    tee: int = Field(0, ge=0, le=255)
    """PSP OS (TEE) SPL."""
    snp: int = Field(0, ge=0, le=255)
    """SNP firmware SPL."""
    microcode: int = Field(0, ge=0, le=255)
    """Microcode SPL."""


HEX = re.compile(r"^([0-9a-f]{2})+$")


class AttestationConfig(_Strict):
    """What the client requires of the split server's TEE. `verifier` is `aws-nitro` (expects
    `pcrs`) or `amd-sev-snp` (expects `measurement`, and `min_tcb`), or a verifier a plugin
    registered (`fedlib.split.attestation.VERIFIERS`). Digests are lowercase hex, as
    `nitro-cli describe-enclaves` and `snpguest display report` print them."""

    verifier: str | None = None
    """`aws-nitro`, `amd-sev-snp` or a registered plugin's name."""
    pcrs: dict[int, str] = {}
    """Nitro: PCR index → expected SHA-384 (PCR0 image, PCR1 kernel, PCR2 application, PCR8 signing certificate)."""
    measurement: str | None = None
    """SEV-SNP: the expected launch MEASUREMENT (48 bytes, 96 hex digits) of the server's VM image."""
    min_tcb: TcbMinimum = TcbMinimum()
    """SEV-SNP: the oldest firmware accepted."""
    allow_debug: bool = False
    """Accept an enclave in debug mode, or a guest whose policy allows debugging (never in production)."""
    max_age_s: float = Field(300, gt=0)
    """Nitro: how old a document may be when it is checked."""
    max_vmpl: int = Field(0, ge=0, le=3)
    """SEV-SNP: the least privileged VMPL a report may be requested at (0: the guest's own firmware level)."""
    min_abi: tuple[int, int] = (1, 51)
    """SEV-SNP: the oldest firmware ABI version accepted, as [major, minor]."""
    crl: str | None = None
    """SEV-SNP: a file holding AMD's CRL for the server's product (from AMD's KDS, `/vcek/v1/<product>/crl`); unset: revocation
    is not checked."""

    @field_validator("pcrs")
    @classmethod
    def _pcr_digests(cls, value: dict[int, str]) -> dict[int, str]:
        for index, digest in value.items():
            if not 0 <= index < 32 or not HEX.match(digest) or len(digest) not in (64, 96, 128):
                raise ValueError(f"PCR{index}: give an index 0..31 and a SHA-384 digest in lowercase hex (96 digits)")
        return value

    @field_validator("measurement")
    @classmethod
    def _measurement(cls, value: str | None) -> str | None:
        if value is not None and (len(value) != 96 or not HEX.match(value)):
            raise ValueError("give the 48-byte launch measurement in lowercase hex (96 digits)")
        return value

    @model_validator(mode="after")
    def _expected_values(self) -> AttestationConfig:
        if self.verifier == "aws-nitro" and 0 not in self.pcrs:
            raise ValueError("pcrs: aws-nitro needs the expected PCR0 at least (nitro-cli build-enclave prints PCR0, PCR1, PCR2)")
        if self.verifier == "amd-sev-snp" and self.measurement is None:
            raise ValueError("measurement: amd-sev-snp needs the expected launch measurement of the server's image")
        return self


class SplitConfig(_Strict):
    """Split fine-tuning (`flows/split_finetune.py`): the client keeps the embeddings, the first
    `cut` blocks and the LM head; a server process holds the other blocks. LoRA (`lora:`) goes
    on both sides; SPF trains the top `spf_fraction` of `spf_modules`' weights by calibrated
    gradient magnitude. `require_tee` refuses a server unless the verifier `attestation` names
    accepts its evidence for this session (`fedlib.tee`). The flow starts the server beside
    itself unless `server_url` names one already running (in a Nitro Enclave or a confidential
    VM). The server holds at most `max_sessions` sessions, drops one idle for `session_ttl_s`,
    and refuses a request body over `max_body_bytes`."""

    cut: int = Field(2, ge=0)
    """The client keeps the embeddings, the first `cut` blocks and the LM head; the server holds the rest."""
    rounds: int = Field(1, ge=1)
    """Split rounds per run."""
    steps: int = Field(20, ge=1)
    """Steps per client per round."""
    batch_size: int = Field(4, ge=1)
    """Examples per step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Learning rate on both sides."""
    spf_modules: tuple[str, ...] = ("down_proj",)
    """Modules whose weights SPF may train sparsely."""
    spf_fraction: float = Field(0.001, gt=0, le=1)
    """Fraction of those weights SPF trains, chosen by calibrated gradient magnitude."""
    calibration_batches: int = Field(2, ge=1)
    """Batches that calibrate the SPF mask."""
    require_tee: bool = False
    """Refuse a server unless `attestation.verifier` accepts its evidence for this session."""
    attestation: AttestationConfig = AttestationConfig()
    """What the client requires of the server's TEE."""
    server_url: str | None = None
    """A split server already running (e.g. `http://10.0.3.7:8443`, in a TEE); unset, the flow starts one beside itself."""
    server_timeout_s: float = Field(300, gt=0)
    """How long a client waits on the split server."""
    max_sessions: int = Field(16, ge=1)
    """Sessions the server holds at once; each client holds at most its share."""
    session_ttl_s: float = Field(900, gt=0)
    """An idle session is dropped after this long."""
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    """A request body over this is refused."""

    @field_validator("server_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("give the split server's http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _verifiable(self) -> SplitConfig:
        if self.require_tee and self.attestation.verifier is None:
            raise ValueError(
                "split.require_tee is set: name the verifier of the server's evidence in split.attestation.verifier (aws-nitro or amd-sev-snp)"
            )
        return self


class SecureAggregationConfig(_Strict):
    """Pairwise masking so that the aggregator learns only the sum of the updates. `threshold`
    reveals are needed to remove the masks (default: a majority of the clients, at least 2);
    `frac_bits` is the fixed-point precision (2^-frac_bits), traded against the largest entry a
    client's update may hold: 2^(31 - frac_bits) / clients (at 24 bits and 3 clients, 42).
    With `bits`, updates are sent instead as stochastically rounded codes of that many bits,
    masked in a ring just large enough for their sum (3 bits per entry for 2-bit codes and 3
    clients, against 32)."""

    enabled: bool = False
    """Pairwise masking: the aggregator learns only the sum of the updates."""
    threshold: int | None = Field(None, ge=2)
    """Reveals needed to remove the masks; more than half the clouds. Unset: a majority, at least 2."""
    frac_bits: int = Field(24, ge=4, le=28)
    """Fixed-point precision (2^-frac_bits), traded against the largest entry an update may hold: 2^(31 - frac_bits) /
    clients."""
    bits: int | None = Field(None, ge=2, le=8)
    """Send stochastically rounded codes of this many bits instead of fixed point, masked in a ring just large enough for
    their sum."""
