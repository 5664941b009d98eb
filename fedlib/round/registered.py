"""The files of a registered model version, pinned by the aggregator's signature.

A registered version is a folder in MLflow's artifact store, which whoever can write to that store
(or to the registry) can edit after the fact. An MLflow model's `MLmodel` file names the code that
loads it: point `python_function.loader_module` at a module planted beside it, and
`mlflow.pyfunc.load_model` imports and runs it. So when the aggregator registers a round's adapter
it signs, beside the round's manifest (`round-NNNN/registered.json`), the SHA-256 of every file of
the version, and fedlib exports or loads a version only after its files match that record: none
missing, none added, none changed (`check_files`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

MAX_PINNED_FILES = 4096


class FilesNotPinned(PermissionError):
    """A version's files differ from the aggregator's signed record of them (or it has none)."""


@dataclass(frozen=True)
class RegisteredFiles:
    """The aggregator's record of one round's registered version: the adapter it holds (by the
    round's digest) and every file of the version's folder, by relative POSIX path."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # no other signed record parses as one

    federation: str
    round: int
    adapter_sha256: str
    files: dict[str, str]  # relative path -> SHA-256


_SCHEMA = TypeAdapter(RegisteredFiles)


def registered_to_json(record: RegisteredFiles) -> dict[str, Any]:
    return _SCHEMA.dump_python(record, mode="json")


def registered_from_json(value: object) -> RegisteredFiles:
    try:
        record = _SCHEMA.validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"not a registered-files record: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
    if len(record.files) > MAX_PINNED_FILES:
        raise ValueError(f"not a registered-files record: over {MAX_PINNED_FILES} files")
    return record


def file_digests(folder: Path) -> dict[str, str]:
    """Every regular file under `folder`, by relative POSIX path, with its SHA-256. A link is
    refused: what it points at is not the version's to pin."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise FilesNotPinned(f"{path.relative_to(folder).as_posix()}: a link, not a file")
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    digest.update(chunk)
            digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def check_files(folder: Path, pinned: Mapping[str, str], what: str) -> None:
    """Refuse `folder` unless its files are exactly `pinned`, naming the first difference."""
    found = file_digests(folder)
    for name in sorted(set(found) | set(pinned)):
        if name not in pinned:
            raise FilesNotPinned(f"{what}: {name} is not a file the aggregator registered (added in the artifact store)")
        if name not in found:
            raise FilesNotPinned(f"{what}: {name} is missing")
        if found[name] != pinned[name]:
            raise FilesNotPinned(f"{what}: {name} is not the file the aggregator registered (changed in the artifact store)")
