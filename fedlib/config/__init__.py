"""The one typed description of a federation, validated once at the flow boundary.

Every later stage trusts these objects, so every check that can be made before a model is
loaded is made here, and an error names the file and the dotted field that is wrong.
`sections` and `parties` hold each section's model, `federation` the whole and its cross-section checks,
`loading` the bounded reading of a file or URL.
"""

from fedlib.config.federation import FederationConfig
from fedlib.config.loading import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, config_from, load_config, parse_config
from fedlib.config.parties import (
    AggregatorKeys,
    BudgetConfig,
    CloudConfig,
    CloudProfile,
    FederationSettings,
    KeyringConfig,
    OrchestrationConfig,
    TrackingConfig,
)
from fedlib.config.sections import (
    BUILTIN_CORPORA,
    BUILTIN_MODELS,
    NOISE_SEED_ENV,
    AggregationConfig,
    AttestationConfig,
    CompressionConfig,
    ConfigError,
    DataConfig,
    EvaluationConfig,
    LoraSettings,
    ModelConfig,
    PartitionConfig,
    PrivacyConfig,
    SecureAggregationConfig,
    SplitConfig,
    TrainingConfig,
)

__all__ = [
    "AggregationConfig",
    "AggregatorKeys",
    "AttestationConfig",
    "BUILTIN_CORPORA",
    "BUILTIN_MODELS",
    "BudgetConfig",
    "CloudConfig",
    "CloudProfile",
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "FederationConfig",
    "FederationSettings",
    "KeyringConfig",
    "LoraSettings",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "ModelConfig",
    "NOISE_SEED_ENV",
    "OrchestrationConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "SplitConfig",
    "TrackingConfig",
    "TrainingConfig",
    "config_from",
    "load_config",
    "parse_config",
]
