"""`fedlib export`: a registered version back into a folder PEFT, transformers (merged) or MLflow
loads, once every one of its files matches the aggregator's signed record of it
(`fedlib.round.registered`), and never over a user's own files."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from fedlib.config import FederationConfig
from fedlib.model.base import load_base_model, load_tokenizer, model_folder
from fedlib.reports.tables import merged_card
from fedlib.round.registered import check_files
from tasks.registry import aggregator_store, registry_client, signed_manifests, versions_by_round


def resolve_version(config: FederationConfig, version: str | None) -> ModelVersion:
    """A version number, an alias, or (None) the champion."""
    client = registry_client(config)
    name = config.registered_model_name
    wanted = version or config.tracking.champion_alias
    try:
        if wanted.isdigit():
            return client.get_model_version(name, wanted)
        return client.get_model_version_by_alias(name, wanted)
    except MlflowException as err:
        raise LookupError(f"registered model {name!r} has no version or alias {wanted!r} (in {config.tracking_uri})") from err


def export_version(
    config: FederationConfig, version: str | None, out: Path, merge: bool, mlflow_model: bool = False, overwrite: bool = False
) -> ModelVersion:
    """Writes the version's PEFT adapter folder to `out`, with the tokenizer and the model card
    (`README.md`), so that `AutoPeftModelForCausalLM.from_pretrained(out)` and
    `AutoTokenizer.from_pretrained(out)` load it; its `base_model_name_or_path` is the base's hub
    id and revision for an `hf:` base, else the folder the base loads from here. With `merge`,
    the base model with the adapter folded in, plus its tokenizer and card: a plain transformers
    folder that needs nothing else. With `mlflow_model`, the version's MLflow model folder as
    registered, for `mlflow.transformers.load_model(out)`.

    Only a signed round's version is exported, and only once every file downloaded from the
    artifact store matches the aggregator's signed record of it (`fedlib.round.registered`):
    nothing of a version is read, let alone loaded, before that. A folder that already holds
    files is refused unless `overwrite` (`FileExistsError`), so a user's files are never
    replaced unasked; the card (`README.md`) is fedlib's, written last."""
    _check_out(out, overwrite)
    chosen = resolve_version(config, version)
    signed = signed_manifests(config)
    rounds = {v: r for r, (v, _) in versions_by_round(registry_client(config), config.registered_model_name, signed).items()}
    if chosen.version not in rounds:
        raise LookupError(f"version {chosen.version} of {config.registered_model_name!r} is not a signed round's adapter; choose another")
    pinned = aggregator_store(config).registered_of(signed[rounds[chosen.version]])
    out.mkdir(parents=True, exist_ok=True)
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=chosen.source, dst_path=tmp, tracking_uri=config.tracking_uri))
        check_files(downloaded, pinned.files, f"version {chosen.version}")
        if mlflow_model:
            for item in downloaded.iterdir():
                shutil.move(str(item), out / item.name)
            return chosen
        adapter = _adapter_folder(downloaded)
        card = (downloaded / "model_card.md").read_text() if (downloaded / "model_card.md").exists() else None
        if not merge:
            for item in adapter.iterdir():
                shutil.move(str(item), out / item.name)  # PEFT's folder holds its own template README.md: replaced below
            _portable_base(out / "adapter_config.json", config.model.source)
        else:
            merged = PeftModel.from_pretrained(load_base_model(config.model.source), str(adapter)).merge_and_unload()
            merged.config.use_cache = True  # the merged model is for generation as much as scoring
            merged.save_pretrained(str(out))
            card = merged_card(card) if card is not None else None
    load_tokenizer(config.model.source).save_pretrained(str(out))
    if card is not None:
        (out / "README.md").write_text(card)
    return chosen


def _check_out(out: Path, overwrite: bool) -> None:
    """`--out` must be a folder that holds nothing yet (or `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out: {out} is a file; name a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", …" if len(held) > 4 else "")
        raise FileExistsError(f"--out: {out} already holds {len(held)} file(s) ({shown}); name an empty or new folder, or add --overwrite")


def _portable_base(adapter_config: Path, source: str) -> None:
    """Point an exported adapter at its base as another machine can find it: an `hf:` base by its
    hub id and the revision this machine holds; a folder or the shipped model by the folder it
    loads from (documented in `docs/results.md`)."""
    settings = json.loads(adapter_config.read_text())
    if source.startswith("hf:"):
        folder = model_folder(source)
        settings["base_model_name_or_path"] = source.removeprefix("hf:")
        settings["revision"] = folder.name  # the snapshot folder is named by its commit
    else:
        settings["base_model_name_or_path"] = str(model_folder(source))
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def _adapter_folder(downloaded: Path) -> Path:
    """The PEFT folder inside a version: the transformers flavour's `peft/`, or for versions
    registered before it, a pyfunc model's `artifacts/adapter` or the version itself."""
    candidates = [downloaded / "peft" / "adapter_config.json", *sorted(downloaded.glob("artifacts/*/adapter_config.json"))]
    for found in [*candidates, downloaded / "adapter_config.json"]:
        if found.exists():
            return found.parent
    raise LookupError(f"no PEFT adapter in {downloaded}")
