"""`fedlib keys init` and `fedlib keys trust`: a party's own key, made and kept on its own
machine, and the explicit local act of trusting a federation's public keys."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from fedlib_cli.common import config_or_report

PARTY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")  # a cloud's name, as the config takes it


def keys_init_command(args: argparse.Namespace) -> int:
    if args.party:
        return _party_key(args.party, args.out)
    from fedlib.wire.keys import init_keys
    from tasks.from_config import key_folder

    if args.config is None:
        print("give a CONFIG (every party's keys on this machine) or --party NAME (one party's key)", file=sys.stderr)
        return 2
    config = config_or_report(args.config)
    if config is None:
        return 2
    folder = key_folder(config)
    created = init_keys(folder, [c.name for c in config.clouds])
    for path in created:
        print(f"created {path} (0600)")
    print(f"{len(created)} key(s) created, the others kept, in {folder}")
    return 0


def keys_trust_command(args: argparse.Namespace) -> int:
    """The explicit local action that makes a party trust a federation's public keys: it prints
    their fingerprints and records their digest under the party's own key, in its own home, with
    the privacy policy of the config it was given (`fedlib.privacy.policy`), which every later run
    of this party is held to. A policy weaker than the one pinned needs `--lower-policy`."""
    from fedlib.privacy.policy import PartyPolicy, weaknesses
    from fedlib.wire.keys import AGGREGATOR, fingerprint, party_keyring, read_key_source
    from fedlib.wire.trust import KeyringNotTrusted, keyring_digest, trust_record
    from tasks.from_config import party_key_source
    from tasks.party_policy import offered

    def read_secret(name: str):  # Prefect is imported only for a secret:BLOCK key source
        from tasks.credentials import read_secret as read

        return read(name)

    config = config_or_report(args.config)
    if config is None:
        return 2
    if config.keyring is None:
        print(f"{args.config}: keyring: missing; trust is for a federation whose parties hold their own keys", file=sys.stderr)
        return 2
    publics = config.keyring.publics
    if args.party != AGGREGATOR and args.party not in publics.clients:
        print(f"--party: {args.party!r} is neither aggregator nor one of keyring.clients {sorted(publics.clients)}", file=sys.stderr)
        return 2
    try:
        party_keyring(publics, args.party, read_key_source(party_key_source(config, args.party), args.party, read_secret))
    except (OSError, KeyError, ValueError) as err:
        print(f"keyring.key_source: {err}", file=sys.stderr)
        return 2
    record = trust_record(publics, args.party)
    try:
        trusted, earlier = record.trusted_digest(), record.pinned_policy()
    except KeyringNotTrusted as err:  # a damaged record: trusting again rewrites it, with the policy asked for
        print(f"{err}; writing it anew", file=sys.stderr)
        trusted, earlier = None, None
    if trusted is not None and trusted != keyring_digest(publics) and not args.replace:
        print(f"{record.path}: {args.party} trusts other keys for this key; add --replace to trust these instead", file=sys.stderr)
        return 1
    policy = offered(config)
    try:
        weaker = weaknesses(PartyPolicy.from_json(earlier), policy) if earlier is not None else []
    except ValueError:
        weaker = []  # an unreadable pin is no floor: the one written now is
    if weaker and not args.lower_policy:
        print(
            f"{args.config}: {'; '.join(weaker)}: weaker than the policy {args.party} pinned in {record.path}; "
            "add --lower-policy to pin this weaker one",
            file=sys.stderr,
        )
        return 1
    print(f"aggregator exchange {fingerprint(publics.aggregator_exchange)}, signing {fingerprint(publics.aggregator_signing)}")
    for name, key in sorted(publics.clients.items()):
        print(f"client {name} {fingerprint(key)}")
    print(f"policy: {policy.describe()}")
    print(f"trusted by {args.party}: {record.write(publics, args.party, policy.to_json())}")
    return 0


def _party_key(party: str, out: Path | None) -> int:
    """One party's key on its own machine: the private half stays in `out` (0600), the public
    half is printed as the config's `keyring` section takes it, with its fingerprint."""
    from fedlib.wire.keys import AGGREGATOR, fingerprint, public_text, write_party_key

    if party != AGGREGATOR and not PARTY.match(party):
        print(
            f"--party: {party!r} is not a party's name: aggregator, or a cloud's name (lowercase letters, digits, - or _)", file=sys.stderr
        )
        return 2
    path = (out or Path(f"~/.fedlib/keys/{party}.pem")).expanduser()
    flag = "--out" if out is not None else "the default key path"
    if path.exists() or path.is_symlink():
        print(
            f"{flag}: {path} exists; a party's key is made once, never overwritten: move it away or choose another --out", file=sys.stderr
        )
        return 1
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        print(f"{flag}: {blocker} is a file, not a folder: choose another --out", file=sys.stderr)
        return 2
    try:
        keys = write_party_key(path, party)
    except OSError as err:
        print(f"{flag}: cannot write {path} ({err.strerror or err}): choose a folder this user can write", file=sys.stderr)
        return 2
    publics = [k.public_key() for k in keys]
    print(f"# private key: {path} (0600); it never leaves this machine")
    if party == AGGREGATOR:
        print(f"aggregator:\n  exchange: {public_text(publics[0])}  # fingerprint {fingerprint(publics[0])}")
        print(f"  signing: {public_text(publics[1])}  # fingerprint {fingerprint(publics[1])}")
    else:
        print(f"clients:\n  {party}: {public_text(publics[0])}  # fingerprint {fingerprint(publics[0])}")
    return 0


def add_parser(sub) -> None:
    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="one party's key (--party NAME; prints its public half), or every party's missing keys (CONFIG)")
    init.add_argument(
        "config",
        nargs="?",
        help="the federation's YAML config (a path or an fsspec URL): make every party's missing keys in its data_dir/keys",
    )
    init.add_argument("--party", help="aggregator, or a cloud's name: make that party's key on this machine")
    init.add_argument("--out", type=Path, help="where the private key goes (default ~/.fedlib/keys/<party>.pem)")
    init.set_defaults(handler=keys_init_command)
    trust = keys.add_parser(
        "trust", help="trust a federation's public keys as this party, on this machine (check the fingerprints it prints)"
    )
    trust.add_argument("config", help="the federation's YAML config (a path or an fsspec URL), with its keyring section")
    trust.add_argument("--party", required=True, help="this machine's party: aggregator or a client's name")
    trust.add_argument("--replace", action="store_true", help="the federation rotated its keys: trust these instead")
    trust.add_argument(
        "--lower-policy", action="store_true", help="pin this config's privacy policy even where it is weaker than the one pinned"
    )
    trust.set_defaults(handler=keys_trust_command)
