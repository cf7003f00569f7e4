"""Real PEFT adapters of tiny random models, for the tests (plain functions: import them).

    from peft_factories import make_tiny_llama, save_lora_adapter, peft_deltas
    path = save_lora_adapter(tmp_path, "a", peft.LoraConfig(r=4, target_modules=["q_proj"]), seed=1)
    deltas = peft_deltas(path)          # {module: PEFT's own delta (out, in)}, loaded back by PEFT

Needs transformers and peft (test dependencies); callers should ``pytest.importorskip("peft")`` first.
Nothing here touches the network: the models are built from configs, with no base_model_name_or_path.
"""

from __future__ import annotations

import copy
import functools
import socket
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

LLAMA_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=64)


@functools.lru_cache(maxsize=4)
def _tiny_llama_template(seed: int, intermediate_size: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**{**LLAMA_SHAPE, "intermediate_size": intermediate_size})
    return transformers.LlamaForCausalLM(config).eval()


def make_tiny_llama(seed: int = 0, *, intermediate_size: int = 64):
    """A fresh tiny random Llama (hidden 32, 2 layers, 4 heads, 2 kv heads: q 32x32, k/v 16x32)."""
    return copy.deepcopy(_tiny_llama_template(seed, intermediate_size))


@functools.lru_cache(maxsize=2)
def _tiny_gpt2_template(seed: int):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def make_tiny_gpt2(seed: int = 0):
    """A fresh tiny random GPT-2: its attention and MLP layers are Conv1D (fan_in_fan_out)."""
    return copy.deepcopy(_tiny_gpt2_template(seed))


def randomize_adapter(model, seed: int, *, std: float = 0.3) -> None:
    """Give every adapter parameter random values (PEFT initialises lora_B / vera_lambda_b to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "vera_lambda" in name:
                param.copy_((torch.randn(param.shape, generator=g) * std).to(param.dtype))


def save_adapter(root: Path, name: str, config, seed: int, *, base: Callable[[], object] = make_tiny_llama,
                 dtype: torch.dtype | None = None, safe_serialization: bool = True) -> Path:
    """Wrap ``base()`` with ``config`` (any PEFT config), randomise the adapter, save it to root/name."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's advice about Conv1D/fan_in_fan_out etc.
        model = peft.get_peft_model(base(), config)
        if dtype is not None:
            model = model.to(dtype)
        randomize_adapter(model, seed)
        path = Path(root) / name
        model.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def save_lora_adapter(tmp_path: Path, name: str, config, seed: int, **kwargs) -> Path:
    """A saved LoRA (or any PEFT) adapter of the tiny Llama; see :func:`save_adapter` for kwargs."""
    return save_adapter(tmp_path, name, config, seed, **kwargs)


def load_peft_model(path: Path, *, base: Callable[[], object] = make_tiny_llama):
    """PEFT's own reading of an adapter directory onto a fresh base model."""
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base(), str(path))


def peft_layers(model) -> dict[str, object]:
    """{module name as in the base model: PEFT tuner layer} of a PeftModel."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inner = model.base_model.model
    return {name: mod for name, mod in inner.named_modules() if isinstance(mod, BaseTunerLayer)}


def peft_deltas(path: Path, *, base: Callable[[], object] = make_tiny_llama,
                adapter: str = "default") -> dict[str, torch.Tensor]:
    """{module: PEFT's get_delta_weight in float32, (out, in) orientation} of a saved adapter."""
    model = load_peft_model(path, base=base)
    out = {}
    for name, layer in peft_layers(model).items():
        delta = layer.get_delta_weight(adapter).float()
        out[name] = delta.T if getattr(layer, "fan_in_fan_out", False) else delta
    return out


def block_network(monkeypatch) -> None:
    """Make any socket connection fail loudly, and put huggingface_hub in offline mode."""
    import huggingface_hub.constants as hf_constants

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
