"""What a party's process takes from Prefect's Secret blocks: its clouds' fsspec credentials and
its own private key. Credentials never sit in a config file or `prefect.yaml`; a cloud's
`secret_block` names a Secret block whose value is a JSON object of fsspec options (keys,
connection strings), and a `secret:BLOCK` key source names the block holding a party's private
key. Without them the provider's own environment applies (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
AZURE_STORAGE_*), and key files or variables on the party's machine.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect.blocks.system import Secret

from fedlib.config import FederationConfig
from fedlib.wire.keys import KeyRing
from tasks.from_config import keyring


def read_secret(name: str) -> Any:
    try:
        return Secret.load(name).get()
    except ValueError as err:
        raise ValueError(f"Secret block {name!r}: {err}") from None


def party_keys(config: FederationConfig, party: str) -> KeyRing:
    """The key ring of `party` (a client's name, or `aggregator`) on its own machine."""
    return keyring(config, party, read_secret=read_secret)


def storage_options(config: FederationConfig, clouds: Iterable[str]) -> dict[str, dict[str, Any]]:
    resolved: dict[str, dict[str, Any]] = {}
    for name in clouds:
        cloud = config.cloud(name)
        options = dict(cloud.storage_options)
        if cloud.secret_block:
            try:
                secret = read_secret(cloud.secret_block)
            except ValueError as err:
                raise ValueError(f"clouds[{name}].secret_block: {err}") from None
            if not isinstance(secret, dict):
                raise ValueError(f"Secret block {cloud.secret_block!r} must hold a JSON object of fsspec options")
            options.update(secret)
        resolved[name] = options
    return resolved
