"""`fedlib run CONFIG`: a federation from the terminal, with progress and a closing table."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fedlib_cli.common import config_or_report, embedded_defaults
from fedlib_cli.live import LiveProgress
from fedlib_cli.ui import add_parser as add_ui_parser

if TYPE_CHECKING:
    from fedlib.config import FederationConfig
    from fedlib.round.manifest import Manifest


def _prepared(args: argparse.Namespace) -> tuple[Console, FederationConfig | None]:
    """What every command that reads a config starts with: the embedded defaults, a console, and
    the config (None once its errors are reported; the command then exits 2)."""
    embedded_defaults(args.verbose)
    console = Console()
    return console, config_or_report(args.config, console)


def _summary_table(manifests: list[Manifest]) -> Table:
    clients = sorted({c for m in manifests for c in m.clients})
    table = Table(title="federation rounds")
    table.add_column("round", justify="right")
    table.add_column("perplexity", justify="right")
    for client in clients:
        table.add_column(f"{client} MB", justify="right")
    table.add_column("rejected")
    table.add_column("seconds", justify="right")
    for m in manifests:
        sizes = [f"{m.clients[c].bytes_uploaded / 1e6:.2f}" if c in m.clients else "-" for c in clients]
        rejected = ", ".join(f"{c} ({r.reason})" for c, r in m.rejected.items()) or "-"
        seconds = m.timings.get("round_s", m.timings.get("evaluate_s", 0.0))
        label = f"{m.round} (base)" if m.round == 0 else str(m.round)
        table.add_row(label, f"{m.perplexity:.2f}", *sizes, rejected, f"{seconds:.1f}")
    return table


def _ui_hint(config_path: Path) -> str:
    fedlib = Path(sys.executable).parent / "fedlib"
    return (
        f"Look at the runs: {fedlib} ui {config_path}\n"
        "  (the Prefect UI on http://127.0.0.1:4200 and the MLflow UI on http://127.0.0.1:5000, this run's own stores)"
    )


def run_command(args: argparse.Namespace) -> int:
    console, config = _prepared(args)
    if config is None:
        return 2
    from flows.federated_training import federated_training

    live = LiveProgress(console)
    progress_log = logging.getLogger("fedlib.progress")
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False  # the live view shows it; Prefect's console handler would repeat it
    progress_log.addHandler(live)
    try:
        with live:
            manifests = federated_training(str(args.config))
    finally:
        progress_log.removeHandler(live)
    console.print(_summary_table(manifests))
    base, final = manifests[0].perplexity, manifests[-1].perplexity
    console.print(f"held-out perplexity: base model {base:.2f} → round {manifests[-1].round} {final:.2f}")
    console.print(f"MLflow run: {manifests[-1].mlflow_run_id} (experiment {config.experiment_name})")
    console.print(_ui_hint(args.config), highlight=False)
    return 0


def split_command(args: argparse.Namespace) -> int:
    """Split fine-tuning: this process plays the clients, a child process the server."""
    console, config = _prepared(args)
    if config is None:
        return 2
    from flows.split_finetune import split_finetune

    result = split_finetune(str(args.config))
    for r in result["rounds"]:
        console.print(
            f"round {r['round']}: held-out perplexity {r['perplexity']:.2f}, "
            f"{r['bytes_per_step']:,.0f} bytes and {r['step_s']:.2f} s per step"
        )
    console.print(f"held-out perplexity: {result['perplexity_before']:.2f} before → {result['rounds'][-1]['perplexity']:.2f} after")
    console.print(f"MLflow run: {result['run_id']} (experiment {config.experiment_name})")
    return 0


def export_command(args: argparse.Namespace) -> int:
    """A registered adapter version to a folder: PEFT's adapter folder, or merged into the base."""
    console, config = _prepared(args)
    if config is None:
        return 2
    from tasks.registry import export_version

    try:
        chosen = export_version(config, args.version, args.out, merge=args.merge)
    except LookupError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    what = "base model with the adapter merged in" if args.merge else "PEFT adapter folder"
    console.print(
        f"{config.registered_model_name} version {chosen.version} (round {chosen.tags.get('round')}, "
        f"held-out perplexity {float(chosen.tags.get('perplexity', 'nan')):.2f}): {what} written to {args.out}"
    )
    return 0


def keys_init_command(args: argparse.Namespace) -> int:
    if args.party:
        return _party_key(args.party, args.out)
    from fedlib.wire.keys import init_keys
    from tasks.from_config import key_folder

    if args.config is None:
        print("give a CONFIG (every party's keys on this machine) or --party NAME (one party's key)", file=sys.stderr)
        return 2
    config = config_or_report(args.config, Console())
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
    their fingerprints and records their digest under the party's own key, in its own home."""
    from fedlib.wire.keys import AGGREGATOR, fingerprint, party_keyring, read_key_source
    from fedlib.wire.trust import keyring_digest, trust_record
    from tasks.from_config import party_key_source

    def read_secret(name: str):  # Prefect is imported only for a secret:BLOCK key source
        from tasks.credentials import read_secret as read

        return read(name)

    config = config_or_report(args.config, Console())
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
    trusted = record.trusted_digest()
    if trusted is not None and trusted != keyring_digest(publics) and not args.replace:
        print(f"{record.path}: {args.party} trusts other keys for this key; add --replace to trust these instead", file=sys.stderr)
        return 1
    print(f"aggregator exchange {fingerprint(publics.aggregator_exchange)}, signing {fingerprint(publics.aggregator_signing)}")
    for name, key in sorted(publics.clients.items()):
        print(f"client {name} {fingerprint(key)}")
    print(f"trusted by {args.party}: {record.write(publics, args.party)}")
    return 0


def _party_key(party: str, out: Path | None) -> int:
    """One party's key on its own machine: the private half stays in `out` (0600), the public
    half is printed as the config's `keyring` section takes it, with its fingerprint."""
    from fedlib.wire.keys import AGGREGATOR, fingerprint, public_text, write_party_key

    path = (out or Path(f"~/.fedlib/keys/{party}.pem")).expanduser()
    try:
        keys = write_party_key(path, party)
    except FileExistsError as err:
        print(err, file=sys.stderr)
        return 1
    publics = [k.public_key() for k in keys]
    print(f"# private key: {path} (0600); it never leaves this machine")
    if party == AGGREGATOR:
        print(f"aggregator:\n  exchange: {public_text(publics[0])}  # fingerprint {fingerprint(publics[0])}")
        print(f"  signing: {public_text(publics[1])}  # fingerprint {fingerprint(publics[1])}")
    else:
        print(f"clients:\n  {party}: {public_text(publics[0])}  # fingerprint {fingerprint(publics[0])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedlib", description="Cross-cloud federated LoRA fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or continue) the federation a YAML config describes")
    run.add_argument("config", type=Path)
    run.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs too")
    run.set_defaults(handler=run_command)
    split = sub.add_parser("split", help="split fine-tuning: the model cut between the clients and a server process")
    split.add_argument("config", type=Path)
    split.add_argument("-v", "--verbose", action="store_true", help="show Prefect's own logs too")
    split.set_defaults(handler=split_command)
    export = sub.add_parser("export", help="write a registered adapter version (default: the champion) to a folder")
    export.add_argument("config", type=Path)
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--version", help="a version number or alias (default: the champion alias)")
    export.add_argument("--merge", action="store_true", help="merge into the base model: a folder AutoModelForCausalLM loads")
    export.add_argument("-v", "--verbose", action="store_true")
    export.set_defaults(handler=export_command)
    add_ui_parser(sub)
    keys = sub.add_parser("keys", help="key management").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="one party's key (--party NAME; prints its public half), or every party's missing keys (CONFIG)")
    init.add_argument("config", type=Path, nargs="?", help="embedded default: every party's keys in data_dir/keys")
    init.add_argument("--party", help="aggregator, or a cloud's name: make that party's key on this machine")
    init.add_argument("--out", type=Path, help="where the private key goes (default ~/.fedlib/keys/<party>.pem)")
    init.set_defaults(handler=keys_init_command)
    trust = keys.add_parser(
        "trust", help="trust a federation's public keys as this party, on this machine (check the fingerprints it prints)"
    )
    trust.add_argument("config", type=Path, help="the federation's config, with its keyring section")
    trust.add_argument("--party", required=True, help="this machine's party: aggregator or a client's name")
    trust.add_argument("--replace", action="store_true", help="the federation rotated its keys: trust these instead")
    trust.set_defaults(handler=keys_trust_command)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
