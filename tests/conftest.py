"""Shared fixtures: a tiny real Llama with its own tokenizer, a small real corpus, real Prefect.

Prefect runs on its ephemeral API against a fresh database per session; MLflow on SQLite in each
test's folder. Nothing here is mocked: only the model is small.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="fedlib-tests-"))
# Before Prefect is imported anywhere: its settings are read once.
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FEDLIB_CACHE", str(ROOT / ".fedlib" / "test-cache"))  # the SmolLM2 conversion, reused

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

PLAYS = {  # genre -> plays copied into the small test corpus
    "tragedies": ["hamlet", "othello", "macbeth"],
    "comedies": ["twelfth-night", "as-you-like-it"],
    "histories": ["richard-ii", "henry-v"],
}


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Seven real plays as `<genre>/<play>.md`, read by the same fsspec path users' files take."""
    from fedlib.data import shakespeare_documents

    wanted = {p for plays in PLAYS.values() for p in plays}
    target = _SESSION_HOME / "corpus"
    for doc in shakespeare_documents():
        if doc.id in wanted:
            (target / doc.group).mkdir(parents=True, exist_ok=True)
            # A third of each play keeps tokenising fast and still gives hundreds of blocks.
            (target / doc.group / f"{doc.id}.md").write_text(doc.text[: len(doc.text) // 3])
    return target


@pytest.fixture(scope="session")
def tiny_model_dir(corpus_dir: Path) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 128) and a byte-level BPE tokenizer trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    target = _SESSION_HOME / "tiny-llama"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"])
    tokenizer.train([str(p) for p in sorted(corpus_dir.glob("*/*.md"))], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def tiny_config_dict(tmp_path: Path, corpus_dir: Path, model_dir: Path, clouds=("aws", "gcp"), **overrides) -> dict:
    """A small federation over the tiny model; `overrides` replace whole top-level sections."""
    config = {
        "federation": {"id": "test", "data_dir": str(tmp_path / "data"), "seed": 7},
        "model": {"source": str(model_dir)},
        "data": {"corpus": None, "urls": [f"file://{corpus_dir}/*/*.md"], "seq_len": 32},
        "partition": {"kind": "iid"},
        "evaluation": {"documents": ["macbeth"], "max_blocks": 8, "batch_size": 8},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {"rounds": 2, "local_steps": 3, "batch_size": 4, "learning_rate": 0.01},
        "aggregation": {"strategy": "fedavg", "min_clients": 1},
        "clouds": [{"name": c, "provider": c if c in ("aws", "gcp", "azure") else "local"} for c in clouds],
    }
    config.update(overrides)
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def tiny_config(tmp_path, corpus_dir, tiny_model_dir):
    """A validated FederationConfig for the tiny model with two clients."""
    from fedlib.config import parse_config

    return parse_config(tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)
