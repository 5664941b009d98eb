"""`fedlib run CONFIG`: a federation from the terminal, with progress and a closing table."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from fedlib_cli.common import PrefectApiStart, config_or_report, embedded_defaults, hold_data_dir, quiet_imports
from fedlib_cli.keys import add_parser as add_keys_parser
from fedlib_cli.live import LiveProgress
from fedlib_cli.pool_templates import add_parser as add_pool_template_parser
from fedlib_cli.ui import add_parser as add_ui_parser

if TYPE_CHECKING:
    from fedlib.config import FederationConfig
    from fedlib.round.manifest import Manifest


def _prepared(args: argparse.Namespace, exclusive: bool = False) -> tuple[Console, FederationConfig | None]:
    """What every command that reads a config starts with: a console, the config with its
    `--set` overrides (None once its errors are reported; the command then exits 2), and the
    embedded defaults for it. `exclusive`: a command that writes the federation's state holds
    its `data_dir` for as long as it runs (`hold_data_dir`); a second one is refused."""
    console = Console(log_path=False)  # the live view's lines say what happened, not where in fedlib
    config = config_or_report(args.config, args.set)
    if config is not None and exclusive:
        refused = hold_data_dir(config.data_path)
        if refused is not None:
            Console(stderr=True, soft_wrap=True).print(refused, style="red", markup=False, highlight=False)
            return console, None
    if config is not None:
        embedded_defaults(args.verbose, config.data_path)
    return console, config


def _flow_config(args: argparse.Namespace) -> str | dict:
    """What the flow's `config` parameter gets: the file's path, or with `--set` the file's
    mapping with the overrides applied (the flow validates it again)."""
    from fedlib.config.loading import raw_config

    return raw_config(str(args.config), args.set) if args.set else str(args.config)


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


def _ui_hint(config_path: str, sets: Sequence[str] = ()) -> str:
    """The command that opens this run's stores: with the same `--set`s, which may have moved them."""
    fedlib = Path(sys.executable).parent / "fedlib"
    flags = "".join(f" --set {shlex.quote(s)}" for s in sets)
    return (
        f"Look at the runs: {fedlib} ui {shlex.quote(config_path)}{flags}\n"
        "  (the Prefect UI on http://127.0.0.1:4200 and the MLflow UI on http://127.0.0.1:5000, this run's own stores)"
    )


def run_command(args: argparse.Namespace) -> int:
    console, config = _prepared(args, exclusive=True)
    if config is None:
        return 2
    prefect_api = PrefectApiStart()  # boots while the libraries below import
    try:
        from tasks.preflight import check_references

        check_references(config)  # a typo in a path or a name fails here, before the first round
        from flows.federated_training import federated_training
    except BaseException:
        prefect_api.cancel()
        raise
    prefect_api.ready()

    live = LiveProgress(console)
    progress_log = logging.getLogger("fedlib.progress")
    progress_log.setLevel(logging.INFO)
    progress_log.propagate = False  # the live view shows it; Prefect's console handler would repeat it
    progress_log.addHandler(live)
    try:
        with live:
            manifests = federated_training(_flow_config(args))
    finally:
        progress_log.removeHandler(live)
    console.print(_summary_table(manifests))
    base, final = manifests[0].perplexity, manifests[-1].perplexity
    console.print(f"held-out perplexity: base model {base:.2f} → round {manifests[-1].round} {final:.2f}")
    console.print(f"MLflow run: {manifests[-1].mlflow_run_id} (experiment {config.experiment_name})")
    console.print(_ui_hint(args.config, args.set), highlight=False, soft_wrap=True)  # a command to copy: never wrapped
    misconfigured = {c: r.detail for c, r in manifests[-1].rejected.items() if r.reason == "misconfigured"}
    if misconfigured:  # the federation ran without them; the run is not a success until they are fixed
        from fedlib.round.preflight import PartiesMisconfigured

        raise PartiesMisconfigured(misconfigured)
    return 0


def split_command(args: argparse.Namespace) -> int:
    """Split fine-tuning: this process plays the clients, a child process the server."""
    console, config = _prepared(args, exclusive=True)
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
    """A registered adapter version to a folder, once its files match the aggregator's signed
    record: PEFT's adapter folder, merged into the base, or the MLflow model as registered."""
    console, config = _prepared(args)
    if config is None:
        return 2
    from fedlib.round.registered import FilesNotPinned
    from tasks.export import export_version

    try:
        chosen = export_version(config, args.version, args.out, merge=args.merge, mlflow_model=args.mlflow_model, overwrite=args.overwrite)
    except (LookupError, FilesNotPinned, FileExistsError) as err:
        console.print(f"[red]{err}[/red]")
        return 2
    what = "base model with the adapter merged in" if args.merge else "MLflow model folder" if args.mlflow_model else "PEFT adapter folder"
    console.print(
        f"{config.registered_model_name} version {chosen.version} (round {chosen.tags.get('round')}, "
        f"held-out perplexity {float(chosen.tags.get('perplexity', 'nan')):.2f}): {what} written to {args.out}"
    )
    return 0


def _with_config(
    parser: argparse.ArgumentParser, verbose: str = "show Prefect's own logs and the libraries' warnings", sets: bool = True
) -> None:
    parser.add_argument("config", help="the federation's YAML config (a path or an fsspec URL: file://, s3://, gs://, az://)")
    if sets:
        parser.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="FIELD=VALUE",
            help="override one config field for this run, e.g. --set training.rounds=1 --set clouds[0].storage=s3://bucket/fl",
        )
    else:
        parser.set_defaults(set=[])
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedlib", description="Cross-cloud federated LoRA fine-tuning")
    parser.add_argument("--version", action="version", version=f"fedlib {_version()}")
    parser.add_argument("--debug", action="store_true", help="on an error, show its traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or continue) the federation a YAML config describes")
    _with_config(run)
    run.set_defaults(handler=run_command)
    split = sub.add_parser("split", help="split fine-tuning: the model cut between the clients and a server process")
    _with_config(split, sets=False)  # its server process reads the same file
    split.set_defaults(handler=split_command)
    export = sub.add_parser("export", help="write a registered adapter version (default: the champion) to a folder")
    _with_config(export, "show the libraries' warnings")
    export.add_argument("--out", type=Path, required=True, help="folder to write")
    export.add_argument("--version", help="a version number or alias (default: the champion alias)")
    export.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files, replacing them")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument("--merge", action="store_true", help="merge into the base model: a folder AutoModelForCausalLM loads")
    shape.add_argument(
        "--mlflow-model",
        action="store_true",
        help="the version's MLflow model folder, its files checked: for mlflow.transformers.load_model",
    )
    export.set_defaults(handler=export_command)
    add_ui_parser(sub)
    add_keys_parser(sub)
    add_pool_template_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Every command's errors end here: a mistake in the config or a flag is its own message
    (exit 2), anything else one line (exit 1); `--debug` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "verbose", False):
        quiet_imports()  # before the first import of torch (and with it tqdm)
    from fedlib.config import ConfigError

    errors = Console(stderr=True, highlight=False, soft_wrap=True)  # one line a mistake, however narrow the terminal
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        errors.print("interrupted", style="red")
        return 130
    except ConfigError as err:
        if args.debug:
            raise
        errors.print(str(err), style="red", markup=False)
        return 2
    except Exception as err:
        if args.debug:
            raise
        said = " ".join(str(err).split()) or "no message"
        errors.print(f"error: {type(err).__name__}: {said}", style="red", markup=False)
        errors.print("(fedlib --debug shows the traceback)", markup=False)
        return 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedlib")
    except PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
