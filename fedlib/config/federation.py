"""The whole config: every section, the checks across sections, and what follows from them
(paths, URLs, the tracking backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_serializer, model_validator

from fedlib.config.parties import (
    BudgetConfig,
    CloudConfig,
    CloudProfile,
    FederationSettings,
    KeyringConfig,
    OrchestrationConfig,
    TrackingConfig,
    _key_source,
)
from fedlib.config.sections import (
    AggregationConfig,
    CompressionConfig,
    DataConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    SplitConfig,
    TrainingConfig,
    _Strict,
)
from fedlib.redaction import loggable, secrets_in
from fedlib.strategies import make_strategy
from fedlib.wire.layout import Layout


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
    """Every party's public keys; unset, one machine plays every party with keys in `data_dir/keys`."""
    clouds: tuple[CloudConfig, ...] = Field(min_length=1)
    """The clients, one per cloud (or region)."""

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
    def artifact_location(self) -> str | None:
        """Where a new experiment keeps its artifacts. With a tracking server (`tracking.uri`),
        unset means the server's own artifact store (its `--artifacts-destination`, a bucket), not
        a folder on the aggregator's disk, which a container loses after each run."""
        if self.tracking.artifact_location:
            return self.tracking.artifact_location
        return None if self.tracking.uri else (self.data_path / "mlartifacts").as_uri()

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
    def profiles(self) -> dict[str, CloudProfile]:
        """Each cloud's profile (speed, prices, capacity), by name: what planning reads."""
        return {cloud.name: cloud.profile for cloud in self.clouds}

    @property
    def layout(self) -> Layout:
        """Where this federation's objects live in each client's bucket (`fedlib.wire.layout`)."""
        return Layout(self.federation.id, {cloud.name: self.storage_url(cloud) for cloud in self.clouds})

    def cloud(self, name: str) -> CloudConfig:
        for cloud in self.clouds:
            if cloud.name == name:
                return cloud
        raise KeyError(f"no cloud named {name!r} in the configuration")
