"""What a party checks before its first round: every reference it will open, opened once, so a
mistake in the config is one line naming the party, the field and the fix, before any training
(not a traceback from a task a minute in).

Each party checks only what it will open itself, with its own credentials: the aggregator its
model source, data, held-out set and checkpoint store; a client its model source, its own files
and its own bucket. Nothing here needs another party's secrets.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from fedlib.config import ConfigError
from fedlib.model.base import model_folder
from fedlib.redaction import redact_text
from fedlib.wire import storage
from fedlib.wire.layout import probe_url


class PreflightFailed(ConfigError):
    """A reference in the config that this party cannot open: `field` names it in the config,
    `fix` says what to do."""

    def __init__(self, party: str, field: str, problem: str, fix: str) -> None:
        self.party, self.field = party, field
        super().__init__(f"{party}: {field}: {problem}; {fix}")


@dataclass(frozen=True)
class PreflightRequest:
    """What the aggregator asks of a client's preflight: whether to write a probe to its bucket
    (a new lineage's first run). It travels as a deployment parameter, so it is checked here."""

    probe_stores: bool

    def to_json(self) -> dict[str, Any]:
        return {"probe_stores": self.probe_stores}

    @classmethod
    def from_json(cls, data: Any) -> PreflightRequest:
        if not isinstance(data, dict) or set(data) != {"probe_stores"} or not isinstance(data["probe_stores"], bool):
            raise ValueError("a preflight request is {probe_stores: true|false}")
        return cls(data["probe_stores"])


class PartiesMisconfigured(ConfigError):
    """Parties whose own checks failed: one line each, naming party, field and fix."""

    def __init__(self, problems: Mapping[str, str]) -> None:
        self.problems = dict(problems)
        lines = [why if why.startswith(f"{party}: ") else f"{party}: {why}" for party, why in sorted(self.problems.items())]
        super().__init__("\n".join(lines))


def check_files(party: str, field: str, urls: Iterable[str], options: Mapping[str, Any] | None = None) -> None:
    """Every URL or glob in `urls` matches at least one file this party can read."""
    for url in urls:
        try:
            found = fsspec.open_files(url, **dict(options or {}))
        except (OSError, ValueError) as err:
            raise PreflightFailed(
                party, field, f"cannot open {url!r} ({_said(err)})", "check the URL and this party's credentials"
            ) from None
        if not found:
            raise PreflightFailed(party, field, f"{url!r} matches no file", "fix the path or glob (relative paths start where you run)")


def check_documents(party: str, named: Iterable[str], known: Iterable[str]) -> None:
    """Every held-out document `evaluation.documents` names is a document of the data."""
    known = sorted(set(known))
    unknown = sorted(set(named) - set(known))
    if unknown:
        close = [m for name in unknown for m in difflib.get_close_matches(name, known, n=2)]
        some = ", ".join(close or known[:5]) + ("" if close or len(known) <= 5 else ", …")
        raise PreflightFailed(
            party,
            "evaluation.documents",
            f"{', '.join(map(repr, unknown))} {'is not a document' if len(unknown) == 1 else 'are not documents'} of the data",
            f"a document is a file's name without its extension ({'did you mean' if close else 'here'}: {some}), or leave it unset",
        )


def check_model_source(party: str, source: str) -> None:
    """The base model resolves on this machine: a shipped model (converted once, here), a local
    folder, a repository in the local Hugging Face cache, or a bucket folder this party can read."""
    try:
        folder = model_folder(source)
    except Exception as err:  # noqa: BLE001 - hub, fsspec and conversion errors: each becomes the one line below
        if source.startswith("hf:"):
            repo = source.removeprefix("hf:")
            fix = f"runs are offline: download it on this machine first (`hf download {repo}`), or name a local model folder"
            raise PreflightFailed(party, "model.source", f"{source!r} is not in this machine's Hugging Face cache", fix) from None
        raise PreflightFailed(
            party, "model.source", f"cannot load {source!r} ({_said(err)})", "name a shipped model, a folder or a URL"
        ) from None
    if not (folder / "config.json").is_file():
        raise PreflightFailed(party, "model.source", f"{source!r} has no config.json", "name a Hugging Face model folder")


def check_writable(party: str, field: str, url: str, options: storage.Options | None = None) -> None:
    """This party can write (and remove) an object under `url`: its bucket, or the checkpoint
    store. The probe's name says what it is, in case a store keeps deleted objects' versions."""
    probe = probe_url(url, party)
    try:
        storage.write_atomic(probe, b"fedlib preflight: this party can write here\n", options)  # as its uploads will
        storage.remove(probe, options)
    except Exception as err:  # noqa: BLE001 - every store's own error type: each becomes the one line below
        raise PreflightFailed(
            party, field, f"cannot write to {url!r} ({_said(err)})", "check the URL, the bucket and this party's credentials"
        ) from None


def _said(err: BaseException) -> str:
    """An error's own words, on one line and without a credential a URL in it may carry."""
    text = " ".join(str(err).split()) or type(err).__name__
    return redact_text(text[:300])
