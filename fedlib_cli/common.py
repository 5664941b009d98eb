"""What every command needs before it starts: quiet embedded defaults and a validated config."""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console


def embedded_defaults(verbose: bool) -> None:
    """Prefect's ephemeral API needs no server; these keep it quiet and patient on small machines.
    Set before Prefect is imported, and never over a user's own settings."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # what reaches the runs' logs in the Prefect UI
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "WARNING")  # what the terminal shows
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        import warnings

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-load weight bars, three clients at a time
        hf_logging.set_verbosity_error()
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.utils.checkpoint")


def config_or_report(path: Path, console: Console):
    """The validated config, or None after printing why not (callers exit with 2): a bad config
    fails before Prefect or a model is started."""
    from fedlib.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as err:
        console.print(f"[red]{err}[/red]")
        return None
