"""A party's pinned privacy policy, read at the task boundary: the policy a config offers, and the
one the party pinned on this machine with `fedlib keys trust` (`fedlib.privacy.policy`)."""

from __future__ import annotations

from fedlib.config import FederationConfig
from fedlib.privacy.policy import PartyPolicy, offered_policy
from fedlib.wire.trust import KeyringNotTrusted, trust_record


def offered(config: FederationConfig) -> PartyPolicy:
    """The privacy policy this config asks a party to run under (`fedlib.privacy.policy`)."""
    return offered_policy(config.privacy, config.secure_aggregation, config.secagg_threshold, config.split, config.compression)


def pinned_policy(config: FederationConfig, party: str) -> PartyPolicy:
    """The policy `party` pinned with `fedlib keys trust` on this machine; a trust record made
    before policies were pinned is refused, so that no party runs without one."""
    assert config.keyring is not None
    record = trust_record(config.keyring.publics, party)
    raw = record.pinned_policy()
    if raw is None:
        raise KeyringNotTrusted(
            f"keyring: {record.path} pins no privacy policy; check the config's privacy settings and run "
            f"`fedlib keys trust CONFIG --party {party}` here"
        )
    try:
        return PartyPolicy.from_json(raw)
    except ValueError as err:
        raise KeyringNotTrusted(f"keyring: {record.path}: {err}; run `fedlib keys trust CONFIG --party {party}` here") from None


def party_policy(config: FederationConfig, party: str) -> PartyPolicy | None:
    """The pinned policy of a party that holds its own key; None for the embedded default, where
    one machine plays every party."""
    return None if config.keyring is None else pinned_policy(config, party)
