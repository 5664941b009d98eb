"""What people read about a federation, computed from its manifests: the round table, the
summary, and a registered adapter version's tags and model card.

Pure functions over committed manifests, so the Prefect artifact, the MLflow registry and a
test all read the same facts from the same place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedlib.rejection import Rejection
from fedlib.round.manifest import Manifest
from fedlib.update.report import ClientReport

_SPARK = "▁▂▃▄▅▆▇█"


def round_rows(sampled: Iterable[str], reports: Mapping[str, ClientReport], rejected: Mapping[str, Rejection]) -> list[dict[str, Any]]:
    """One row per client sampled for the round, accepted or not: a client left out still has a
    row saying why, with whatever it reported before it was."""
    rows = []
    for client in sampled:
        report = reports.get(client)
        rejection = rejected.get(client)
        rows.append(
            {
                "client": client,
                "status": "accepted" if rejection is None else f"left out: {rejection.reason}",
                "train_loss": round(report.train_loss, 4) if report and report.train_loss is not None else None,
                "examples": report.num_examples if report else None,
                "local_steps": report.local_steps if report else None,
                "bytes_uploaded": report.bytes_uploaded if report else None,
                "bytes_downloaded": report.bytes_downloaded if report else None,
                "train_s": round(report.train_s, 2) if report else None,
            }
        )
    return rows


def sparkline(values: list[float]) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(_SPARK[round((v - low) / span * (len(_SPARK) - 1))] for v in values)


def summary_markdown(federation: str, manifests: list[Manifest], mlflow_run_url: str, registered_model: str, champion: str | None) -> str:
    """The federation's summary: the perplexity curve as a line and a table, and where to look next."""
    curve = [m.perplexity for m in manifests if m.perplexity is not None]
    lines = [
        f"# Federation `{federation}`",
        "",
        f"Held-out perplexity, base model → round {manifests[-1].round}: **{_shown(curve[0] if curve else None)} → {_shown(curve[-1] if curve else None)}**  `{sparkline(curve)}`",
        "",
        "| round | perplexity | eval loss | clients accepted | left out | bytes uploaded |",
        "|---:|---:|---:|---|---|---:|",
    ]
    for m in manifests:
        left_out = ", ".join(f"{c} ({r})" for c, r in left_out_of(m).items()) or "-"
        label = "0 (base)" if m.round == 0 else str(m.round)
        lines.append(
            f"| {label} | {_shown(m.perplexity)} | {_shown(m.eval_loss, '.4f')} | {', '.join(m.accepted) or '-'} | {left_out} | {m.bytes_uploaded:,} |"
        )
    lines += ["", f"MLflow run, with the perplexity chart and every round's manifest: [{mlflow_run_url}]({mlflow_run_url})"]
    if champion is not None:
        lines.append(f"Registered model `{registered_model}`: version {champion} is the `champion` (lowest held-out perplexity).")
    return "\n".join(lines) + "\n"


def _shown(score: float | None, spec: str = ".2f") -> str:
    """A score as the tables show it; "-" for a round not scored (yet)."""
    return "-" if score is None else format(score, spec)


def left_out_of(manifest: Manifest) -> dict[str, str]:
    """Clients sampled for the round whose update is not in the aggregate, and why."""
    return {client: rejection.reason for client, rejection in manifest.rejected.items()}


def version_tags(manifest: Manifest, base_revision: str) -> dict[str, str]:
    """The few tags of a round's registry version, what people filter and sort versions by: its
    round, its perplexity, its adapter's digest (which ties it to the signed manifest), its
    base's revision, and with DP the ε spent. The rest of its lineage is its model card.
    Only a scored round is registered."""
    if manifest.perplexity is None:
        raise ValueError(f"round {manifest.round} is not scored yet: it has no version to register")
    tags = {
        "round": str(manifest.round),
        "perplexity": repr(float(manifest.perplexity)),
        "adapter_sha256": manifest.adapter_sha256,
        "base_model_revision": base_revision,
    }
    if manifest.privacy is not None:
        tags["epsilon"] = repr(float(manifest.privacy.epsilon))
    return tags


ADAPTER_ONLY = "the adapter is applied to it, never shipped with it"


def model_card(manifest: Manifest, base_model: str, base_revision: str, registered_model: str) -> str:
    """A round's adapter as people read it in MLflow and beside an exported folder: what it is
    trained from and on, by whom, how well it does, what it cost to move and may have leaked."""
    clients = manifest.clients
    accepted = [c for c in manifest.accepted if c in clients]
    privacy = manifest.privacy
    lines = [
        f"# {registered_model}, round {manifest.round}",
        "",
        f"A LoRA adapter of federation `{manifest.federation}`: round {manifest.round} of its signed lineage.",
        "",
        f"- base model: `{base_model}` (revision `{base_revision}`); {ADAPTER_ONLY}",
        f"- held-out perplexity {_shown(manifest.perplexity)} (eval loss {_shown(manifest.eval_loss, '.4f')}), "
        f"aggregated by `{manifest.strategy}`, codecs: {', '.join(manifest.codecs) or 'none'}",
        f"- trained from round {manifest.round - 1}'s adapter `{manifest.parent_adapter_sha256[:16]}`; "
        f"this adapter `{manifest.adapter_sha256[:16]}`",
        f"- clients: {', '.join(accepted) or 'none'}; left out: "
        + (", ".join(f"{c} ({why})" for c, why in left_out_of(manifest).items()) or "none"),
        f"- bytes uploaded {manifest.bytes_uploaded:,}, across cloud boundaries {manifest.bytes_crossing_clouds:,}",
        f"- privacy: ε = {privacy.epsilon:.4g} at δ = {privacy.delta:g}" if privacy is not None else "- privacy: no differential privacy",
        f"- MLflow run `{manifest.mlflow_run_id}`"
        + (f", Prefect flow run `{manifest.prefect_flow_run_id}`" if manifest.prefect_flow_run_id else ""),
        "",
        "| client | examples | local steps | data digest |",
        "|---|---:|---:|---|",
    ]
    for client in accepted:
        report = clients[client]
        lines.append(f"| {client} | {report.num_examples} | {report.local_steps} | `{report.data_digest or '-'}` |")
    return "\n".join(lines) + "\n"


def merged_card(card: str) -> str:
    """A version's card for the merged export, which does ship the base: the adapter folded into it."""
    merged = "this folder is the base model with the adapter folded into its weights: it needs nothing else"
    return card.replace(ADAPTER_ONLY, merged)


def adapter_artifact_path(round_number: int) -> str:
    """Where the registry task logs a round's adapter in the federation's MLflow run."""
    return f"adapters/round-{round_number:04d}"


@dataclass(frozen=True)
class RegistryEntry:
    """A registry version as the registry lists it: tags anyone with registry write can set."""

    version: str
    tags: Mapping[str, str]
    run_id: str
    source: str


def signed_versions(entries: Iterable[RegistryEntry], signed: Mapping[int, Manifest]) -> dict[int, tuple[str, float]]:
    """round → (version, held-out perplexity), only for versions that are a signed round's adapter:
    the round's digest, logged by the round's MLflow run at the path the registry task writes.
    The perplexity is the round's signed score record's (joined onto its manifest), never the
    version's tag, and a round without one is not a candidate; the earliest such version of a
    round stands for it. Anything else in the registry (a version planted with a low
    `perplexity` tag, or one claiming a round's tags over another artifact) is not a candidate."""
    found: dict[int, tuple[str, float]] = {}
    for entry in sorted(entries, key=lambda e: int(e.version)):
        try:
            round_number = int(entry.tags.get("round", ""))
        except ValueError:
            continue
        manifest = signed.get(round_number)
        if manifest is None or manifest.perplexity is None or round_number in found:
            continue
        if entry.tags.get("adapter_sha256") != manifest.adapter_sha256:
            continue
        if entry.run_id != manifest.mlflow_run_id or entry.source != f"runs:/{entry.run_id}/{adapter_artifact_path(round_number)}":
            continue
        found[round_number] = (entry.version, manifest.perplexity)
    return found


def champion_of(versions: Iterable[tuple[str, float]]) -> str | None:
    """The version with the lowest perplexity; the earlier version wins a tie."""
    best: tuple[float, int, str] | None = None
    for version, perplexity in versions:
        key = (perplexity, int(version), version)
        if best is None or key < best:
            best = key
    return None if best is None else best[2]
