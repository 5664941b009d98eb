"""Round runs left open by a federation run that died.

A round is a subflow that runs inside the federation's process. When that process is killed (an
OOM kill, a lost machine, a preempted node), Prefect marks the federation run Crashed, but nothing
ever reports for the round inside it: the UI would show it Running for ever. The next federation
run, which resumes the lineage, closes such rounds, so the API says what happened."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.states import Crashed


@task(name="close-orphaned-rounds", cache_policy=NO_CACHE)
def close_orphaned_rounds(round_flow: str) -> list[str]:
    """Marks Crashed each run of `round_flow` still Pending or Running whose federation run has
    ended; returns their names. A round whose federation run is alive is left alone."""
    closed: list[str] = []
    with get_client(sync_client=True) as client:
        unfinished = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[round_flow])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING, StateType.RUNNING]))
            ),
        )
        for run in unfinished:
            if run.parent_task_run_id is None:
                continue
            parent = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
            if parent.state is None or not parent.state.is_final():
                continue
            why = f"its federation run {parent.name} ({parent.id}) ended {parent.state.name}"
            client.set_flow_run_state(run.id, Crashed(message=why), force=True)
            closed.append(run.name)
    if closed:
        get_run_logger().warning("closed %s: their federation run had ended", ", ".join(closed))
    return closed
