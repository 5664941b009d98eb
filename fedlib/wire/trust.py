"""What a party trusts and what it has answered, kept where no config can move it.

Whoever starts a party's flow runs hands it its config, and everything in a config can change
from one run to the next: `federation.id`, `data_dir`, the buckets, the key source. So the two
records that protect a party from that person live in the party's own home directory, taken
from the operating system's user database (not `$HOME`, which a job's environment can set), and
are named after the party's own public key:

- the keyring it trusts (`trust/<fingerprint>.json`): written only by `fedlib keys trust`, an
  explicit action on the party's machine; at run time a config whose public keys differ from
  the trusted ones is refused, and so is a key with no trust record at all. The same record pins
  the party's privacy policy (`fedlib.privacy.policy`), which this module stores as it is given;
- its secure-aggregation reveals (`reveals/<fingerprint>/`): one answer per session, whatever
  bucket a request names and whatever happens to the objects in it.

A party therefore needs a home that persists between its runs, as its key file does.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from fedlib.wire.keys import AGGREGATOR, PublicKeys, fingerprint, public_text


def party_home() -> Path:
    """`~/.fedlib` of the user this process runs as, from the user database."""
    return Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".fedlib"


def keyring_digest(publics: PublicKeys) -> str:
    """SHA-256 over every public key of the federation, in a fixed order."""
    listed = {
        "aggregator": [public_text(publics.aggregator_exchange), public_text(publics.aggregator_signing)],
        "clients": {name: public_text(key) for name, key in sorted(publics.clients.items())},
    }
    return hashlib.sha256(json.dumps(listed, sort_keys=True).encode()).hexdigest()


class KeyringNotTrusted(PermissionError):
    """This party never trusted the config's keyring on this machine (or trusted another)."""


@dataclass(frozen=True)
class TrustRecord:
    """The keyring a party trusts, named by its own key's fingerprint."""

    own_fingerprint: str
    home: Path

    @property
    def path(self) -> Path:
        return self.home / "trust" / f"{self.own_fingerprint}.json"

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("keyring_sha256"), str):
            raise KeyringNotTrusted(f"{self.path}: not a trust record; run `fedlib keys trust` again")
        return record

    def trusted_digest(self) -> str | None:
        record = self._read()
        return None if record is None else str(record["keyring_sha256"])

    def pinned_policy(self) -> object | None:
        """The policy pinned with the keyring, as written (parsed by `fedlib.privacy.policy`);
        None where the record predates policies or there is no record."""
        record = self._read()
        return None if record is None else record.get("policy")

    def write(self, publics: PublicKeys, party: str, policy: object) -> Path:
        record = {
            "party": party,
            "keyring_sha256": keyring_digest(publics),
            "policy": policy,
            "aggregator_exchange": fingerprint(publics.aggregator_exchange),
            "aggregator_signing": fingerprint(publics.aggregator_signing),
            "clients": {name: fingerprint(key) for name, key in sorted(publics.clients.items())},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(self.path)
        return self.path

    def require(self, publics: PublicKeys, party: str) -> None:
        """Refuse a keyring this party has not trusted, by an explicit local action."""
        trusted, offered = self.trusted_digest(), keyring_digest(publics)
        if trusted is None:
            raise KeyringNotTrusted(
                f"keyring: {party} has not trusted this federation's public keys on this machine; check their "
                f"fingerprints and run `fedlib keys trust CONFIG --party {party}` here"
            )
        if trusted != offered:
            raise KeyringNotTrusted(
                f"keyring: the config's public keys (digest {offered[:16]}) are not the ones {party} trusts on this "
                f"machine ({trusted[:16]}, in {self.path}); if the federation rotated its keys, run "
                f"`fedlib keys trust CONFIG --party {party} --replace` here"
            )


def trust_record(own: PublicKeys, party: str, home: Path | None = None) -> TrustRecord:
    """The trust record of `party`, whose public key `own` lists (the aggregator's exchange key)."""
    key = own.aggregator_exchange if party == AGGREGATOR else own.clients[party]
    return TrustRecord(fingerprint(key), home or party_home())


def reveal_folder(own_fingerprint: str, home: Path | None = None) -> Path:
    """Where a client's reveal ledger lives on its own machine."""
    return (home or party_home()) / "reveals" / own_fingerprint
