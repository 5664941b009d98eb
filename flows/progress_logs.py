"""`fedlib.progress` events in the Prefect run's own logs, so the Prefect UI shows what the CLI
shows (round started, each client's steps and losses, rejections, perplexities)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from prefect import get_run_logger

from fedlib.progress import LOGGER


class _ToRunLogs(logging.Handler):
    def __init__(self, run_logger: logging.LoggerAdapter) -> None:
        super().__init__(logging.INFO)
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        self.run_logger.log(record.levelno, record.getMessage())


@contextlib.contextmanager
def progress_in_run_logs() -> Iterator[None]:
    """For the current flow run: every progress event, from any thread of this process."""
    handler = _ToRunLogs(get_run_logger())
    if LOGGER.level == logging.NOTSET or LOGGER.level > logging.INFO:
        LOGGER.setLevel(logging.INFO)
    LOGGER.addHandler(handler)
    try:
        yield
    finally:
        LOGGER.removeHandler(handler)
