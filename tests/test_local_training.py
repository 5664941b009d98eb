"""Local training on transformers' Trainer, with the tiny model: what the loss covers, and that
accumulation, checkpointing, precision and several processes change how a step is computed, not
what it computes."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
import torch

from fedlib.config import ConfigError, LoraSettings, parse_config
from fedlib.data.records import assistant_spans, tokenize_records
from fedlib.examples import IGNORE, Examples
from fedlib.model.base import adapter_state, attach_lora, load_base_model, load_tokenizer
from fedlib.model.distributed import train_in_processes
from fedlib.model.pool import POOL, ModelKey
from fedlib.model.threads import intra_op_threads, thread_share
from fedlib.model.training import TrainingPlan, evaluate_loss, train_lora
from fedlib.placement import CPU_FP32, Placement
from tests.conftest import CHATML, ROOT, tiny_config_dict, write_config

LORA = LoraSettings(r=4, alpha=8)
CONVERSATION = [
    {"role": "user", "content": "Who is Hamlet's mother?"},
    {"role": "assistant", "content": "Gertrude, Queen of Denmark."},
    {"role": "user", "content": "And his father?"},
    {"role": "assistant", "content": "The late King Hamlet, whose ghost walks."},
]


@pytest.fixture
def tokenizer(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.chat_template == CHATML
    return tok


def _records(n: int, seed: int = 0) -> list[dict]:
    """Short prompt/completion records of varying length: none is a whole block long."""
    g = torch.Generator().manual_seed(seed)
    words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
    out = []
    for i in range(n):
        k = int(torch.randint(2, 8, (1,), generator=g))
        pick = [words[int(j)] for j in torch.randint(len(words), (k,), generator=g)]
        out.append({"prompt": f"Question {i}: " + " ".join(pick[: k // 2]) + "?", "completion": " " + " ".join(pick[k // 2 :])})
    return out


def _model(tiny_model_dir: Path):
    torch.manual_seed(0)
    return attach_lora(load_base_model(str(tiny_model_dir)), LORA, seed=3)


def test_prompt_tokens_carry_no_loss_counted_against_the_chat_template(tokenizer):
    tokenised = tokenize_records([{"messages": CONVERSATION}], tokenizer, 512, "chat.jsonl")
    example = tokenised.examples
    labelled = example.labels[0][example.labels[0] != IGNORE]

    # Independently of the masking code: each assistant turn is what the template adds between
    # the generation prompt for it and the conversation through it.
    expected = []
    for i in (1, 3):
        before = tokenizer.apply_chat_template(CONVERSATION[:i], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(CONVERSATION[: i + 1], tokenize=False)
        expected += tokenizer(through, add_special_tokens=False)["input_ids"][
            len(tokenizer(before, add_special_tokens=False)["input_ids"]) :
        ]
    assert labelled.tolist() == expected
    answers = tokenizer.decode(labelled)
    assert answers.startswith("Gertrude, Queen of Denmark.") and "The late King Hamlet, whose ghost walks." in answers
    assert "mother" not in answers and "father" not in answers and "SmolLM" not in answers
    full = tokenizer(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]
    assert example.input_ids[0, : example.lengths[0]].tolist() == full  # the whole conversation is input
    assert len(full) - len(expected) > 40  # system prompt, both user turns and the role headers: no loss
    assert assistant_spans(tokenizer, CONVERSATION)[1][0][0] > 0

    pc = tokenize_records([{"prompt": "Who wrote Hamlet?", "completion": " Shakespeare."}], tokenizer, 64, "pc.jsonl").examples
    completion = tokenizer(" Shakespeare.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert pc.labels[0][pc.labels[0] != IGNORE].tolist() == completion
    assert pc.loss_tokens == len(completion)


def test_a_prompt_that_fills_the_block_is_dropped_and_counted(tokenizer):
    records = [{"prompt": "word " * 100, "completion": " end"}, {"prompt": "Hi?", "completion": " Hello."}]
    tokenised = tokenize_records(records, tokenizer, 32, "long.jsonl")
    assert tokenised.dropped == 1 and len(tokenised.examples) == 1


def test_short_records_are_trained_on(tokenizer, tiny_model_dir):
    examples = tokenize_records(_records(32), tokenizer, 64, "short.jsonl").examples
    assert len(examples) == 32 and int(examples.lengths.max()) < 32  # every record shorter than half a block
    model = _model(tiny_model_dir)
    before = evaluate_loss(model, examples, 8)
    result = train_lora(model, examples, TrainingPlan(steps=20, batch_size=8, learning_rate=2e-2, seed=1))
    assert len(result.losses) == 20 and all(math.isfinite(x) for x in result.losses)
    assert result.tokens_seen == pytest.approx(20 * 8 * float(examples.lengths.float().mean()), rel=0.5)
    assert evaluate_loss(model, examples, 8) < before - 0.5


def _trained(tiny_model_dir, examples, **plan) -> dict[str, torch.Tensor]:
    model = _model(tiny_model_dir)
    train_lora(model, examples, TrainingPlan(steps=3, batch_size=8, learning_rate=1e-2, seed=5, **plan))
    return adapter_state(model)


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_accumulated_micro_batches_give_the_update_of_one_big_batch(tokenizer, tiny_model_dir):
    # Records of different lengths: the loss is normalised by the step's label tokens, not per micro-batch.
    examples = tokenize_records(_records(48), tokenizer, 64, "short.jsonl").examples
    whole = _trained(tiny_model_dir, examples)
    accumulated = _trained(tiny_model_dir, examples, gradient_accumulation_steps=4)
    start = adapter_state(_model(tiny_model_dir))
    assert _max_diff(whole, start) > 1e-3  # it trained
    assert _max_diff(whole, accumulated) < 1e-5  # float summation order only


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, corpus_dir):
    batch = torch.randint(3, 1000, (4, 32), generator=torch.Generator().manual_seed(0))

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _model(tiny_model_dir)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=batch, labels=batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and any(float(g.abs().max()) > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    blocks = torch.randint(3, 1000, (32, 32), generator=torch.Generator().manual_seed(1))
    assert _max_diff(_trained(tiny_model_dir, blocks), _trained(tiny_model_dir, blocks, gradient_checkpointing=True)) < 1e-5


def test_a_bf16_step_runs(tiny_model_dir):
    blocks = torch.randint(3, 1000, (16, 32), generator=torch.Generator().manual_seed(2))
    model = attach_lora(load_base_model(str(tiny_model_dir), Placement("cpu", "bf16")), LORA, seed=3)
    assert next(model.base_model.model.model.layers[0].mlp.parameters()).dtype == torch.bfloat16
    start = adapter_state(model)
    result = train_lora(model, blocks, TrainingPlan(steps=2, batch_size=4, learning_rate=1e-2, seed=0, precision="bf16"))
    assert all(math.isfinite(x) for x in result.losses)
    trained = adapter_state(model)
    assert all(v.dtype == torch.float32 for v in trained.values())  # the update stays fp32
    assert _max_diff(trained, start) > 1e-3


def test_two_gloo_processes_give_the_one_process_update(tokenizer, tiny_model_dir):
    examples = tokenize_records(_records(48), tokenizer, 64, "short.jsonl").examples
    plan = dict(steps=3, batch_size=8, learning_rate=1e-2, seed=5)
    one = _trained(tiny_model_dir, examples)
    start = adapter_state(_model(tiny_model_dir))
    key = ModelKey(str(tiny_model_dir), CPU_FP32, LORA, 3)
    steps = []
    run = train_in_processes(key, start, examples, examples.head(4), TrainingPlan(**plan, processes=2), 4, steps.append)
    assert [s.step for s in steps] == [1, 2, 3]  # rank 0's progress reached this process
    assert run.validation is not None and run.validation.tokens == examples.head(4).loss_tokens
    assert len(run.training.losses) == 3
    assert _max_diff(one, start) > 1e-3
    assert _max_diff(run.adapter, one) < 1e-5


def test_quantization_without_cuda_fails_at_validation_naming_the_field(tmp_path, corpus_dir, tiny_model_dir):
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["training"] = {**raw["training"], "quantization": "4bit"}
    if torch.cuda.is_available():
        assert parse_config(raw).training.placement.quantization == "4bit"
        return
    with pytest.raises(ConfigError, match=r"training.*quantization: 4bit .*needs a CUDA device"):
        parse_config(raw)
    raw["training"] = {**raw["training"], "quantization": "none", "gradient_accumulation_steps": 3}
    with pytest.raises(ConfigError, match="not divisible"):
        parse_config(raw)


def test_records_in_three_formats_load_from_files(tmp_path, tokenizer):
    from fedlib.data.records import load_records

    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": CONVERSATION}) for _ in range(3)))
    (tmp_path / "text.json").write_text(json.dumps([{"text": "a short line"}, {"text": "another"}]))
    import datasets

    datasets.Dataset.from_list(_records(5)).to_parquet(str(tmp_path / "pc.parquet"))
    cache = str(tmp_path / "cache")
    chat = tokenize_records(load_records(f"file://{tmp_path}/chat.jsonl", None, cache), tokenizer, 256, "chat").examples
    text = tokenize_records(load_records(str(tmp_path / "text.json"), None, cache), tokenizer, 256, "text").examples
    pc = tokenize_records(load_records(str(tmp_path / "pc.parquet"), None, cache), tokenizer, 256, "pc").examples
    assert (len(chat), len(text), len(pc)) == (3, 2, 5)
    assert text.loss_tokens == int((text.lengths - 1).sum())  # plain text: every token after the first
    assert isinstance(chat, Examples) and chat.loss_tokens < int(chat.lengths.sum()) // 2


def test_the_shipped_instruction_records_train_a_federation(tmp_path, corpus_dir, tiny_model_dir):
    """configs/instruct's records (chat and prompt/completion) as each cloud's own data, scored on
    the aggregator's own evaluation file: the loss on the answers falls; MLflow gets each client's
    data as a dataset (digest and size only) and its system metrics."""
    from mlflow.tracking import MlflowClient

    from flows.federated_training import federated_training

    folder = ROOT / "configs" / "instruct"
    raw = tiny_config_dict(tmp_path, corpus_dir, tiny_model_dir)
    raw["data"] = {"seq_len": 128}
    raw["evaluation"] = {"data": [str(folder / "eval.jsonl")], "max_blocks": 32, "batch_size": 16}
    raw["training"] = {"rounds": 2, "local_steps": 8, "batch_size": 8, "learning_rate": 0.02}
    raw["clouds"][0]["data"] = [str(folder / "aws.jsonl")]
    raw["clouds"][1]["data"] = [str(folder / "gcp.jsonl")]
    loads = POOL.loads
    manifests = federated_training(str(write_config(tmp_path, raw)))
    assert [m.round for m in manifests] == [0, 1, 2]
    # Two clients training at once need two models; every other round and every evaluation
    # borrows one of them (loading per client per round and per evaluation would be 7).
    assert POOL.loads - loads <= 2
    assert manifests[-1].eval_loss < manifests[0].eval_loss - 0.25
    report = manifests[1].clients["aws"]
    assert report.num_examples == 320 and len(report.data_digest) == 16 and report.peak_memory_mib > 100

    config = parse_config(raw)
    run = MlflowClient(config.tracking_uri).get_run(manifests[-1].mlflow_run_id)
    datasets = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"aws-train", "gcp-train", "evaluation"}
    assert datasets["aws-train"].digest == report.data_digest and "Hamlet" not in datasets["aws-train"].profile
    assert run.data.metrics["system/aws/peak_memory_mib"] > 100 and run.data.metrics["client/aws/tokens_per_s"] > 0


def test_clients_training_at_once_each_get_their_own_share_of_the_cores():
    """Two client threads inside their blocks at the same time: each sees its own team width
    (torch's setting is per calling thread), and each gets back what it had after."""
    seen: dict[str, int] = {}
    both_inside = threading.Barrier(2)

    def client(name: str, threads: int) -> None:
        before = torch.get_num_threads()
        with intra_op_threads(threads):
            both_inside.wait()
            seen[name] = torch.get_num_threads()
            both_inside.wait()
        seen[f"{name} after"] = torch.get_num_threads() - before

    workers = [threading.Thread(target=client, args=(name, n)) for name, n in (("aws", 1), ("gcp", 3))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert seen == {"aws": 1, "gcp": 3, "aws after": 0, "gcp after": 0}
    assert [thread_share(3, 2), thread_share(2, 8), thread_share(1, 4), thread_share(0, 4)] == [1, 4, 4, 4]
