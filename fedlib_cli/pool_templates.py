"""`fedlib pool-template`: a client's work-pool template, locked against whoever starts its runs.

Prefect's default base job templates let every flow run override, through `job_variables`, the
command, the environment and the image of the container it starts, and on ECS the task role,
on Cloud Run and Kubernetes the service account, on ACI the identities and the entrypoint. The
federation's orchestrator starts every client run, so with those templates it could run any
command in a client's pool, with the client's key volume and bucket role. A locked template
(`lock`) removes those variables and writes their values into `job_configuration` itself:
the command is the worker's own (`prefect flow-run execute`, or the process worker's engine),
the image is the one the party audited, named by digest, the identity is the pool owner's
choice, and the environment is the worker's own. What a flow run can still set (CPU, memory,
timeouts, names) changes no code and no identity.

One subtlety: Prefect merges a run's `env` job variable into a `job_configuration.env` that is a
mapping, whatever the variables schema says (`BaseJobConfiguration.from_template_and_values`),
so a locked template leaves `env` out altogether; a party's fixed environment belongs in the
container definition inside `job_configuration` (the ECS task definition, the Kubernetes job
manifest, the Cloud Run job body), where no placeholder reaches it.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from importlib import resources
from pathlib import Path
from typing import Any

from tasks.job_lock import LOCKED

DIGEST = re.compile(r"^[^\s@]+@sha256:[0-9a-f]{64}$")
# Left in the shipped templates for `fedlib pool-template` to fill: a pool made from a shipped file
# as it is fails to start a container, rather than start one from an image nobody pinned.
IMAGE_TO_PIN = "REGISTRY/fedlib@sha256:PIN-THE-DIGEST-OF-THE-IMAGE-YOU-AUDITED"
IDENTITY_TO_SET = "SET-WITH-fedlib-pool-template--identity"

TEMPLATE_FILES = {kind: f"{kind}.json" for kind in LOCKED}


class TemplateError(ValueError):
    """A template this command cannot lock as asked."""


def lock(default: dict[str, Any], kind: str, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """`default` (a worker's default base job template) with `LOCKED[kind]`'s variables removed
    and their placeholders in `job_configuration` replaced: by `fixed[name]` where given, else
    the variable's own default (the image and the identity by the sentinels above, which
    `fedlib pool-template` fills; `env` dropped, see above)."""
    names, identity = LOCKED[kind]
    sentinels = {"image": IMAGE_TO_PIN, **({identity: IDENTITY_TO_SET} if identity else {})}
    template = copy.deepcopy(default)
    properties = template["variables"]["properties"]
    values: dict[str, Any] = {}
    for name in names:
        schema = properties.pop(name, None)
        if schema is None:
            raise TemplateError(f"{kind}: the template has no variable {name!r}; is it this pool type's?")
        values[name] = (fixed or {}).get(name, sentinels.get(name, schema.get("default")))
    required = template["variables"].get("required")
    if required:
        template["variables"]["required"] = [name for name in required if name not in names]
    configuration = template["job_configuration"]
    configuration.pop("env", None)
    template["job_configuration"] = _filled(configuration, values)
    return template


def _filled(node: Any, values: dict[str, Any]) -> Any:
    """Every `{{ name }}` of a locked variable replaced by its value; one inside a longer string
    is refused (it would keep the caller's value in part)."""
    if isinstance(node, dict):
        return {key: _filled(value, values) for key, value in node.items()}
    if isinstance(node, list):
        return [_filled(value, values) for value in node]
    if isinstance(node, str):
        for name, value in values.items():
            placeholder = re.compile(r"\{\{\s*" + re.escape(name) + r"\s*\}\}")
            if placeholder.fullmatch(node):
                return value
            if placeholder.search(node):
                raise TemplateError(f"{{{{ {name} }}}} inside {node[:60]!r}: lock it by hand")
    return node


def shipped(kind: str) -> dict[str, Any]:
    """The locked template shipped in `deployments/work-pools/`."""
    return json.loads(
        Path(str(resources.files("fedlib_cli"))).parent.joinpath("deployments", "work-pools", TEMPLATE_FILES[kind]).read_text()
    )


def pool_template_command(args: argparse.Namespace) -> int:
    """Print the shipped locked template of `args.kind` with this party's image and identity."""
    fixed: dict[str, Any] = {}
    if args.kind != "process":
        if args.image is None or not DIGEST.match(args.image):
            print("--image: give the image this party audited, by digest (REPOSITORY@sha256:<64 hex digits>)", file=sys.stderr)
            return 2
        fixed["image"] = args.image
    elif args.image is not None:
        print("--image: a process pool runs the party's own checkout, not an image", file=sys.stderr)
        return 2
    identity = LOCKED[args.kind][1]
    if args.identity is not None:
        if identity is None:
            print(f"--identity: a {args.kind} pool runs as its worker's own user", file=sys.stderr)
            return 2
        try:
            fixed[identity] = json.loads(args.identity) if args.identity.lstrip().startswith(("[", "{")) else args.identity
        except ValueError:
            print(f"--identity: {args.identity[:60]!r} is not valid JSON", file=sys.stderr)
            return 2
    text = json.dumps(shipped(args.kind))
    for sentinel, value in ((IMAGE_TO_PIN, fixed.get("image")), (IDENTITY_TO_SET, fixed.get(identity) if identity else None)):
        text = text.replace(json.dumps(sentinel), json.dumps(value))
    print(json.dumps(json.loads(text), indent=2))
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "pool-template", help="a client's work-pool template, locked: no flow run can change its command, image, env or identity"
    )
    parser.add_argument("kind", metavar="KIND", choices=sorted(LOCKED), help="the work pool's type: " + ", ".join(sorted(LOCKED)))
    parser.add_argument("--image", help="the image this party audited, by digest: REPOSITORY@sha256:DIGEST (container pools)")
    parser.add_argument("--identity", help="the role, service account or identities (JSON) the party's containers run as")
    parser.set_defaults(handler=pool_template_command)
