"""Instruction and chat records → `Examples`, with the loss on what the model should learn to say.

Records are read with Hugging Face `datasets` (JSON/JSONL, Parquet, Arrow; fsspec URLs with the
party's storage options). Each file holds one of three formats, told apart by its first record:

- `text`: plain text; cut into `seq_len` pieces, every token a label, the last piece padded.
- `prompt` / `completion`: strings are joined as they are (the completion ends with EOS); lists
  of messages are rendered by the tokenizer's chat template. Only the completion is a label.
- `messages`: a conversation rendered by the tokenizer's chat template. Only the assistant turns
  (with the template's end-of-turn marker) are labels.

A record longer than `seq_len` is cut to it; one left with no label token (its prompt fills the
block) is dropped and counted. Short records are kept, padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from fedlib.examples import IGNORE, Examples, padded

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}
FORMATS = ("text", "prompt_completion", "messages")


class RecordError(ValueError):
    """A record file that is not one of the three formats (the message names file and record)."""


def is_record_file(url: str) -> bool:
    return PurePosixPath(url.split("?", 1)[0]).suffix in BUILDERS


def load_records(url: str, options: dict | None, cache_dir: str) -> list[dict[str, Any]]:
    """Every record behind `url` (a file or a glob), read by `datasets` with this party's
    storage options; the Arrow cache lives in the party's own `cache_dir`."""
    import datasets

    builder = BUILDERS[PurePosixPath(url.split("?", 1)[0]).suffix]
    datasets.disable_progress_bars()
    dataset = datasets.load_dataset(builder, data_files=[url], split="train", storage_options=options or {}, cache_dir=cache_dir)
    return dataset.to_list()


def record_format(record: Any, where: str) -> str:
    if isinstance(record, dict):
        if isinstance(record.get("messages"), list):
            return "messages"
        if "prompt" in record and "completion" in record:
            return "prompt_completion"
        if isinstance(record.get("text"), str):
            return "text"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise RecordError(f"{where}: expected 'text', 'prompt' and 'completion', or 'messages'; got {keys}")


@dataclass(frozen=True)
class Tokenised:
    examples: Examples
    dropped: int  # records with no label token left within seq_len


def tokenize_records(records: list[dict[str, Any]], tokenizer, seq_len: int, where: str) -> Tokenised:
    rows: list[tuple[list[int], list[int]]] = []
    dropped = 0
    kind = record_format(records[0], f"{where}: record 1") if records else "text"
    for number, record in enumerate(records, start=1):
        here = f"{where}: record {number}"
        if record_format(record, here) != kind:
            raise RecordError(f"{here}: a {record_format(record, here)} record in a file of {kind} records")
        if kind == "text":
            rows.extend(_text_rows(tokenizer, record["text"], seq_len))
            continue
        ids, labels = (
            _prompt_completion(tokenizer, record, here)
            if kind == "prompt_completion"
            else _conversation(tokenizer, record["messages"], here)
        )
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        rows.append((ids, labels))
    return Tokenised(padded(rows, seq_len, tokenizer.pad_token_id), dropped)


def _text_rows(tokenizer, text: str, seq_len: int) -> list[tuple[list[int], list[int]]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    pieces = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [(p, list(p)) for p in pieces if len(p) > 1]


def _prompt_completion(tokenizer, record: dict, where: str) -> tuple[list[int], list[int]]:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list) and isinstance(completion, list):  # conversational: rendered by the template
        return _conversation(tokenizer, [*prompt, *completion], where, first_label=len(prompt))
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise RecordError(f"{where}: 'prompt' and 'completion' must both be strings or both be lists of messages")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids + completion_ids, [IGNORE] * len(prompt_ids) + completion_ids


def assistant_spans(tokenizer, messages: list[dict], first_label: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template renders it, and the character spans of the
    assistant turns from message `first_label` on: each turn's text from where the template's
    generation prompt ends to where the turn (its end marker included) ends. A template whose
    rendering of a prefix is not a prefix of the whole cannot be masked this way, and is refused."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or i < first_label:
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise RecordError("the tokenizer's chat template does not render a conversation's prefix as its prefix")
        spans.append((len(before), len(through)))
    return full, spans


def _conversation(tokenizer, messages: Any, where: str, first_label: int = 0) -> tuple[list[int], list[int]]:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise RecordError(f"{where}: messages must be a list of {{'role', 'content'}} objects")
    if getattr(tokenizer, "chat_template", None) is None:
        raise RecordError(f"{where}: the model's tokenizer has no chat template to render messages with")
    text, spans = assistant_spans(tokenizer, messages, first_label)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    labels = [
        t if any(a <= start and end <= b for a, b in spans) and end > start else IGNORE
        for t, (start, end) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels
