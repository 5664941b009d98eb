"""Where and in what precision a party holds the base model: `training.device`, `dtype` and
`quantization` resolved against this machine.

`auto` means what a user would pick by hand: the GPU if there is one (CUDA, then Apple's MPS),
bf16 where the GPU supports it, and fp32 on a CPU, where results stay exact and comparable
across machines (`dtype: bf16` trains about 1.9× faster on our 2-core test CPU, see
`bench/throughput.py`, at bf16's precision). QLoRA (`4bit`, `8bit`) goes through bitsandbytes and needs
CUDA; asking for it elsewhere fails when the config is read, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Device = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["auto", "bf16", "fp16", "fp32"]
Quantization = Literal["none", "4bit", "8bit"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: str  # cuda | mps | cpu
    dtype: str  # bf16 | fp16 | fp32: the base weights' dtype, and the autocast precision
    quantization: str = "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


CPU_FP32 = Placement("cpu", "fp32")


def available_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve(device: Device, dtype: DType, quantization: Quantization) -> Placement:
    """The placement on this machine; raises ValueError naming the field that cannot hold here."""
    chosen = available_device() if device == "auto" else device
    if chosen == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device: cuda was asked for, and this machine has no CUDA device")
    if chosen == "mps" and available_device() != "mps":
        raise ValueError("training.device: mps was asked for, and this machine has no MPS device")
    if quantization != "none" and chosen != "cuda":
        raise ValueError(
            f"training.quantization: {quantization} (QLoRA through bitsandbytes) needs a CUDA device, and this "
            f"machine trains on {chosen}; set training.quantization: none"
        )
    if dtype == "auto":
        dtype = "bf16" if chosen == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype == "fp16" and chosen == "cpu":
        raise ValueError("training.dtype: fp16 needs a GPU (no fp16 autocast on a CPU); use bf16 or fp32")
    return Placement(chosen, dtype, quantization)
