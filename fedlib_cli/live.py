"""The live view of `fedlib run`: a bar for the rounds and one per client (steps done of its
budget, last loss, tokens/s), drawn from the typed events of `fedlib.progress`, never from
log text. Other events print as lines above the bars."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedlib.progress import ClientStep, ClientTrained, Event, PlanMade, RoundDone, RoundStarted


class LiveProgress(logging.Handler):
    def __init__(self, console: Console) -> None:
        super().__init__(logging.INFO)
        self.bars = Progress(
            TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed:>3.0f}/{task.total:<3.0f}"),
            TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=console,
        )  # fmt: skip
        self.rounds: TaskID | None = None
        self.clients: dict[str, TaskID] = {}

    def __enter__(self) -> LiveProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.__exit__(*exc)

    def emit(self, record: logging.LogRecord) -> None:
        event: Event | None = getattr(record, "event", None)
        if event is None:
            return
        self.show(event, record.levelno)

    def show(self, event: Event, level: int = logging.INFO) -> None:
        if isinstance(event, ClientStep):
            self._client_step(event)
            return
        if not isinstance(event, ClientTrained):
            self.bars.console.log(str(event), style="yellow" if level >= logging.WARNING else None, markup=False)
        if isinstance(event, PlanMade):
            self.rounds = self.bars.add_task("rounds", total=event.last - event.first + 1, detail="")
        elif isinstance(event, RoundStarted):
            for task in self.clients.values():
                self.bars.remove_task(task)
            self.clients = {c: self.bars.add_task(f"  {c} r{event.round}", total=event.steps.get(c, 1), detail="") for c in event.clients}
        elif isinstance(event, ClientTrained) and event.client in self.clients:
            self.bars.update(self.clients[event.client], detail="done" if event.loss is None else f"done, mean loss {event.loss:.3f}")
        elif isinstance(event, RoundDone) and self.rounds is not None:
            self.bars.update(self.rounds, advance=1, detail=f"perplexity {event.perplexity:.2f}")

    def _client_step(self, event: ClientStep) -> None:
        task = self.clients.get(event.client)
        if task is None:
            task = self.clients[event.client] = self.bars.add_task(f"  {event.client} r{event.round}", total=event.steps, detail="")
        self.bars.update(task, completed=event.step, total=event.steps,
                         detail=("" if event.loss is None else f"loss {event.loss:.3f}  ") + f"{event.tokens_per_s:,.0f} tok/s")  # fmt: skip
