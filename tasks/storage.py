"""Each cloud's fsspec options: the config's non-secret ones plus its Prefect Secret block.

Credentials never sit in a config file or `prefect.yaml`. A cloud's `secret_block` names a
Secret block whose value is a JSON object of fsspec options (keys, connection strings); without
one, the provider's own environment variables apply (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect.blocks.system import Secret

from fedlib.config import FederationConfig


def storage_options(config: FederationConfig, clouds: Iterable[str]) -> dict[str, dict[str, Any]]:
    resolved: dict[str, dict[str, Any]] = {}
    for name in clouds:
        cloud = config.cloud(name)
        options = dict(cloud.storage_options)
        if cloud.secret_block:
            try:
                secret = Secret.load(cloud.secret_block).get()
            except ValueError as err:
                raise ValueError(f"clouds[{name}].secret_block {cloud.secret_block!r}: {err}") from None
            if not isinstance(secret, dict):
                raise ValueError(f"Secret block {cloud.secret_block!r} must hold a JSON object of fsspec options")
            options.update(secret)
        resolved[name] = options
    return resolved
