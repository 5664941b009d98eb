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
os.environ.setdefault("FEDLIB_ALLOW_NOISE_SEED", "1")  # some tests pin the DP noise; refused outside tests
os.environ.setdefault("FEDLIB_CACHE", str(ROOT / ".fedlib" / "test-cache"))  # the SmolLM2 conversion, reused

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

CHATML = (  # SmolLM2-Instruct's chat template, as its tokenizer ships it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAYS = {  # genre -> plays copied into the small test corpus
    "tragedies": ["hamlet", "othello", "macbeth"],
    "comedies": ["twelfth-night", "as-you-like-it"],
    "histories": ["richard-ii", "henry-v"],
}


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """Seven real plays as `<genre>/<play>.md`, read by the same fsspec path users' files take."""
    from fedlib.data.corpus import shakespeare_documents

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
    fast.chat_template = CHATML  # so that chat records render as they do for SmolLM2
    fast.save_pretrained(target)
    config = LlamaConfig(
        vocab_size=fast.vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
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


@pytest.fixture(scope="session")
def emulators():
    """S3 (moto), GCS (gcp-storage-emulator) and Azure Blob (Azurite) on 127.0.0.1."""
    import logging

    from scripts.emulators import AzuriteEmulator, GCSEmulator, S3Emulator

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    started = [S3Emulator().start(), GCSEmulator().start(), AzuriteEmulator().start()]
    yield dict(zip(("s3", "gcs", "azure"), started, strict=True))
    for emulator in reversed(started):
        emulator.stop()


def cloud_clouds(emulators, bucket_suffix: str) -> list[dict]:
    """One client per provider, each on its own emulator. S3 credentials come from the
    environment (the test sets AWS_*), GCS is anonymous, Azure's connection string sits in a
    Prefect Secret block."""
    return [
        {
            "name": "aws",
            "provider": "aws",
            "storage": f"s3://aws-{bucket_suffix}/updates",
            # botocore's own retries off: the upload task's retries are the policy under test.
            "storage_options": {
                "endpoint_url": emulators["s3"].url,
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
            },
            "work_pool": "aws-pool",
        },
        {
            "name": "gcp",
            "provider": "gcp",
            "storage": f"gs://gcp-{bucket_suffix}/updates",
            "storage_options": {"endpoint_url": emulators["gcs"].url, "token": "anon"},
            "work_pool": "gcp-pool",
        },
        {
            "name": "azure",
            "provider": "azure",
            "storage": f"az://azure-{bucket_suffix}/updates",
            "secret_block": "azurite-connection",
            "work_pool": "azure-pool",
        },
    ]


def stored_update_context(config, client: str, round_number: int, blob: bytes):
    """The context the aggregator opens a stored update with: its parent is round n−1's
    committed adapter; its secure session, if any, is read from the header (and bound)."""
    from fedlib.wire.envelope import EnvelopeContext, peek_header
    from tasks.from_config import checkpoint_store

    parent = checkpoint_store(config).manifest(round_number - 1).adapter_sha256
    return EnvelopeContext(config.federation.id, round_number, client, peek_header(blob).get("session", ""), parent)


def scan_ciphertext_only(config, options_by_cloud) -> int:
    """Every object under every cloud's storage: no safetensors header and no 64-byte run of any
    tensor in the clear. Returns how many objects were scanned."""
    import re
    import struct

    from fedlib.wire import storage
    from fedlib.wire.envelope import open_sealed
    from fedlib.wire.serialization import bytes_to_tensors
    from tasks.from_config import aggregator_update_key, keyring

    ring = keyring(config)
    scanned = 0
    for cloud in config.clouds:
        options = options_by_cloud.get(cloud.name, {})
        for path in storage.list_prefix(config.storage_url(cloud), options):
            fs, _ = storage.filesystem(config.storage_url(cloud), options)
            blob = fs.cat_file(path)
            (size,) = struct.unpack_from("<Q", blob, 0)
            assert not blob[8 : 8 + size].startswith(b"{"), path  # not a safetensors header
            # Markers of 5+ bytes only: random ciphertext contains any given 3 bytes by chance
            # (b"F32" turned up once in a CI run), a given 5 bytes about once in 10^8 objects.
            for marker in (b"__metadata__", b'"dtype"', b'"F32"', b"lora_A", b"num_examples"):
                assert marker not in blob, (path, marker)
            if path.endswith(".shard"):  # the client's distributed training data, sealed for it
                from tasks.from_config import shard_place

                plaintext = open_sealed(blob, aggregator_update_key(ring, cloud.name), shard_place(config, cloud.name).context)
            else:
                round_number = int(re.search(r"round-(\d+)", path).group(1))
                ctx = stored_update_context(config, cloud.name, round_number, blob)
                plaintext = open_sealed(blob, aggregator_update_key(ring, cloud.name), ctx)
            for name, tensor in bytes_to_tensors(plaintext).items():
                raw = tensor.numpy().tobytes()
                for start in range(0, max(1, len(raw) - 64), max(64, len(raw) // 8)):
                    assert raw[start : start + 64] not in blob, (path, name)
            scanned += 1
    return scanned
