"""A party's own files, tokenised on its own machine into `Examples`, cached on its own disk.

Text files (`.txt`, `.md`) are documents cut into whole blocks, as the corpus is. Record files
(`.json`, `.jsonl`, `.parquet`, `.arrow`) are instruction or chat records (`fedlib.data.records`),
one example each, the loss on completions only. The cache is keyed by each file's path, size
and stamp (`files_version`), so a file changed in place is read again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedlib.data.corpus import files_version, tokenize_blocks, url_documents
from fedlib.data.records import is_record_file, load_records, tokenize_records
from fedlib.examples import Examples
from fedlib.model.base import load_tokenizer

log = logging.getLogger(__name__)


def own_examples(urls: tuple[str, ...], options: dict | None, label: str, model_source: str, seq_len: int, cache: Path) -> Examples:
    """A party's own files (text or instruction records) as examples of `seq_len` tokens under
    `model_source`'s tokenizer, cached in `cache` (the party's own disk) until the files change."""
    if not urls:
        return Examples.empty(seq_len)
    key = f"{model_source}|{label}|{seq_len}|{files_version(urls, options)}"
    cached = cache / f"examples-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if cached.exists():
        return Examples.from_tensors(load_file(str(cached)))
    tokenizer = load_tokenizer(model_source)
    parts = []
    texts = tuple(u for u in urls if not is_record_file(u))
    if texts:
        parts.append(Examples.from_blocks(tokenize_blocks(url_documents(texts, options), tokenizer, seq_len).tokens))
    for url in (u for u in urls if is_record_file(u)):
        records = load_records(url, options, str(cache / "datasets"))
        tokenised = tokenize_records(records, tokenizer, seq_len, url)
        if tokenised.dropped:
            log.warning("%s: %d records have no completion token within data.seq_len=%d and are left out", url, tokenised.dropped, seq_len)
        parts.append(tokenised.examples)
    examples = Examples.concat(parts, seq_len)
    if not len(examples):
        raise ValueError(f"{label}: {', '.join(urls)} hold no example of at least two tokens")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{uuid.uuid4().hex}.tmp")
    save_file(examples.tensors(), str(tmp))
    os.replace(tmp, cached)
    return examples
