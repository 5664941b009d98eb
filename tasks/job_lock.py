"""What whoever starts a client's runs may not change about the job that runs them.

The shipped work-pool templates are locked (`fedlib pool-template`): no flow run can set the
command, image, environment or identity of a client's container. A client also checks, when its
run starts, that it was started as the client's deployment, unchanged: the client-training
entrypoint, and no job variable that a locked template would have refused. That second check
is what a client can see from inside; it cannot stop a command that never starts this code,
which is why the templates are locked where the pool is created, by the pool's owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class UnlockedJob(PermissionError):
    """A client run started otherwise than as the client's deployment, unchanged."""


# Per pool type: the variables a flow run may no longer set, and the identity among them.
LOCKED: dict[str, tuple[tuple[str, ...], str | None]] = {
    "process": (("command", "env", "working_dir"), None),
    "ecs": (("command", "env", "image", "task_definition_arn", "task_role_arn"), "task_role_arn"),
    "cloud-run-v2": (("command", "env", "image", "args", "env_from_secrets", "service_account_name"), "service_account_name"),
    "azure-container-instance": (("command", "env", "image", "entrypoint", "identities"), "identities"),
    "kubernetes": (("command", "env", "image", "service_account_name"), "service_account_name"),
}
LOCKED_VARIABLES = frozenset(name for names, _ in LOCKED.values() for name in names)
CLIENT_ENTRYPOINT = "flows/client_training.py:client_training"


def refuse_unlocked_job(entrypoint: str | None, *job_variables: Mapping[str, Any] | None) -> None:
    """One line naming what was changed, if the run is not the client's deployment as shipped."""
    if entrypoint != CLIENT_ENTRYPOINT:
        raise UnlockedJob(f"entrypoint: this run's deployment runs {entrypoint!r}, not {CLIENT_ENTRYPOINT}; redeploy the client")
    changed = sorted({name for variables in job_variables for name in (variables or {}) if name.split(".")[0] in LOCKED_VARIABLES})
    if changed:
        raise UnlockedJob(
            f"job_variables: {changed} set on this client's run or deployment; a client's command, image, environment and identity "
            "are its pool's (`fedlib pool-template`), not the caller's"
        )
