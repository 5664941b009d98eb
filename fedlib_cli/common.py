"""What every command needs before it starts: quiet embedded defaults and a validated config."""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

_HELD: list = []  # this process's open lock files: a lock lasts as long as the process holding it


def hold_data_dir(data_path: Path) -> str | None:
    """Take `data_dir`'s run lock for the rest of this process (the kernel drops it when the process
    ends, however it ends); None once held, else why not in one line. Two runs on one `data_dir`
    would race to migrate its MLflow and Prefect databases and then write each other's rounds."""
    lock = data_path / ".fedlib-run.lock"
    try:
        data_path.mkdir(parents=True, exist_ok=True)
        handle = lock.open("a+")
    except OSError as err:
        return f"federation.data_dir: cannot use {data_path} ({err.strerror or err}); choose a folder this user can write"
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read(200).strip() or "its process is unknown"
        handle.close()
        return f"federation.data_dir: {data_path} is in use by another fedlib run ({holder}); wait for it to end, or give this run another data_dir"
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    handle.flush()
    _HELD.append(handle)
    return None


def embedded_defaults(verbose: bool, data_path: Path | None = None) -> None:
    """Prefect's ephemeral API needs no server; these keep it quiet and patient on small machines,
    and keep its state (the runs' database) in this federation's `data_dir`, so that deleting it
    deletes them. Set before Prefect is imported, and never over a user's own settings."""
    if data_path is not None:
        (data_path / "prefect").mkdir(parents=True, exist_ok=True)  # Prefect makes its home without parents
        os.environ.setdefault("PREFECT_HOME", str(data_path / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")  # what reaches the runs' logs in the Prefect UI
    # what the terminal shows: the live view, and Prefect's own lines (tracebacks included) only with -v
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "INFO" if verbose else "CRITICAL")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not verbose:
        quiet(data_path / "logs" / "libraries.log" if data_path is not None else None)


class PrefectApiStart:
    """Prefect's temporary server, started in the background when no `PREFECT_API_URL` is set.
    Its start (a process that imports Prefect's server and, on a new `data_dir`, creates its
    database: 10-17 s on 2 cores) then overlaps this process's imports of transformers, peft and
    MLflow instead of following them. The server is Prefect's own `SubprocessASGIServer`, the
    one `get_client` would start: the flow finds it running and uses it, and Prefect stops it at
    exit. `ready()` before anything talks to Prefect's API (a failed start is retried there, and
    says why); `cancel()` when the command stops before that."""

    def __init__(self) -> None:
        from prefect.settings import PREFECT_API_URL

        self._server = None
        self._starting: threading.Thread | None = None
        if PREFECT_API_URL.value():
            return
        from prefect.server.api.server import SubprocessASGIServer

        self._server = SubprocessASGIServer()
        self._starting = threading.Thread(target=self._start, name="prefect-api-start", daemon=True)
        self._starting.start()

    def _start(self) -> None:
        try:
            self._server.start()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - left not running: the flow's own start tries again and reports it
            pass

    def ready(self) -> None:
        if self._starting is not None:
            self._starting.join()

    def cancel(self) -> None:
        if self._server is not None:
            self._server.stop()  # its start, waiting on it, then fails and gives up
        self.ready()


def quiet_imports() -> None:
    """The switches libraries read once, when they are imported: set before the first of them is
    (reading a config imports torch, which imports tqdm), unless `-v` asked for their output."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow's database set-up lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm's own switch: GGUF conversion, dataset maps


def quiet(log_file: Path | None) -> None:
    """The console shows the live view and fedlib's own lines: the libraries' progress bars are
    off, their info lines stay at warning level, and Python warnings go to `log_file` (none:
    nowhere). `-v` leaves all of them as the libraries set them."""
    quiet_imports()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-load weight bars, three clients at a time
    hf_logging.set_verbosity_error()
    logging.captureWarnings(True)
    warned = logging.getLogger("py.warnings")
    warned.propagate = False
    warned.handlers.clear()
    if log_file is None:
        warned.addHandler(logging.NullHandler())
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    warned.addHandler(handler)


def config_or_report(path: str, overrides: Sequence[str] = ()):
    """The validated config, or None after printing why not on stderr (callers exit with 2): a
    bad config fails before Prefect or a model is started."""
    from fedlib.config import ConfigError, load_config

    try:
        return load_config(str(path), overrides)
    except ConfigError as err:
        Console(stderr=True, soft_wrap=True).print(str(err), style="red", markup=False, highlight=False)
        return None
