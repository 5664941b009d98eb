"""Local training throughput: tokens/s, seconds per step and peak memory, through the same
`train_lora` (transformers' Trainer) a client runs.

    .venv/bin/python bench/throughput.py [--steps 4] [--batch 4] [--seq 128]

CPU rows: the demo model (SmolLM2-135M) in fp32 and bf16, with and without gradient
checkpointing. GPU rows, when this machine has CUDA: SmolLM2-135M and a ~1.1B Llama-architecture
model with random weights (throughput needs no trained weights) in bf16 and 4-bit (QLoRA), with
model FLOP utilisation. Each row runs in its own process, so its peak memory is its own (the
CPU's peak resident set; on a GPU, the peak allocated by torch). Inputs are random token ids;
the step's cost does not depend on which tokens they are.

MFU counts 4·N FLOPs per token for N base parameters (forward 2N, backward to the activations 2N;
the frozen base needs no weight gradients, LoRA's are negligible; attention's own FLOPs are left
out), over the step's wall time, against the GPU's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10G": 125.0}
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)  # TinyLlama's shape  # fmt: skip


def _model_source(name: str) -> str:
    if name == "smollm2-135m":
        return "smollm2-135m-instruct"
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / "fedlib-bench-llama-1b"
    if not (folder / "config.json").exists():
        with torch.device("cpu"):
            model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16)
        model.save_pretrained(folder)
    return str(folder)


def run_row(model_name: str, device: str, dtype: str, quantization: str, checkpointing: bool, steps: int, batch: int, seq: int) -> dict:
    from fedlib.config import LoraSettings
    from fedlib.model.base import attach_lora, load_base_model
    from fedlib.model.training import TrainingPlan, train_lora
    from fedlib.placement import Placement

    placement = Placement(device, dtype, quantization)
    base = load_base_model(_model_source(model_name), placement, checkpointing)
    params = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, LoraSettings(r=8, alpha=16, target_modules=("q_proj", "v_proj")), seed=0)
    vocab = base.config.vocab_size
    blocks = torch.randint(3, vocab, (batch * (steps + 1), seq), generator=torch.Generator().manual_seed(0))
    precision = dtype
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    plan = dict(batch_size=batch, learning_rate=1e-4, seed=0, gradient_checkpointing=checkpointing, precision=precision)
    train_lora(model, blocks, TrainingPlan(steps=1, **plan))  # warm-up: kernels, allocator, trainer set-up
    stamps: list[float] = []
    train_lora(model, blocks, TrainingPlan(steps=steps, **plan), lambda _: stamps.append(time.perf_counter()))
    if device == "cuda":
        torch.cuda.synchronize()
    step_s = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    tokens_per_s = batch * seq / step_s
    if device == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        mfu = 4 * params * tokens_per_s / (peak * 1e12) if peak else None
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        name, mfu = f"CPU ({os.cpu_count()} cores)", None
    return {"model": model_name, "device": name, "dtype": dtype if quantization == "none" else f"{quantization} ({dtype} compute)",
            "checkpointing": checkpointing, "tokens_per_s": tokens_per_s, "step_s": step_s, "peak_gib": peak_gib, "mfu": mfu,
            "params": params}  # fmt: skip


def rows(cuda: bool) -> list[tuple]:
    out = [("smollm2-135m", "cpu", dtype, "none", ckpt) for dtype in ("fp32", "bf16") for ckpt in (False, True)]
    if cuda:
        out += [(m, "cuda", "bf16", q, False) for m in ("smollm2-135m", "llama-1b") for q in ("none", "4bit")]
        out += [("llama-1b", "cuda", "bf16", "none", True)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row, as JSON
    args = parser.parse_args()
    if args.row:
        model, device, dtype, quantization, ckpt = json.loads(args.row)
        print("ROW " + json.dumps(run_row(model, device, dtype, quantization, ckpt, args.steps, args.batch, args.seq)))
        return 0
    cuda = torch.cuda.is_available()
    print(f"batch {args.batch} × {args.seq} tokens, {args.steps} timed steps after one warm-up; LoRA r=8 on q_proj, v_proj")
    header = f"{'model':<14} {'device':<28} {'dtype':<20} {'grad ckpt':<9} {'tokens/s':>9} {'s/step':>7} {'peak GiB':>8} {'MFU':>6}"
    print(header)
    print("-" * len(header))
    for row in rows(cuda):
        done = subprocess.run([sys.executable, __file__, "--row", json.dumps(row), "--steps", str(args.steps),
                               "--batch", str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True)  # fmt: skip
        found = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if done.returncode or not found:
            print(f"{row[0]:<14} {row[1]:<28} {row[2]}/{row[3]}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(found[0][4:])
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['model']:<14} {r['device'][:28]:<28} {r['dtype']:<20} {'on' if r['checkpointing'] else 'off':<9} "
              f"{r['tokens_per_s']:>9.0f} {r['step_s']:>7.2f} {r['peak_gib']:>8.2f} {mfu:>6}")  # fmt: skip
    if not cuda:
        print("no CUDA device on this machine: the GPU rows (SmolLM2 and a ~1.1B Llama in bf16 and 4-bit, with MFU) were not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
