"""PEFT adapter directories <-> per-module LoRA factors (the only place that knows PEFT's format).

Reading: :func:`open_adapter` validates a directory (or Hub id) from its ``adapter_config.json`` and the
safetensors *header* (no tensor data); :func:`load_factors` reads one module's tensors and folds the
adapter's scale into ``b`` once, so that ``delta = b @ a`` is the update PEFT adds to the weight, in
the (out_features, in_features) orientation of ``nn.Linear.weight``. Writing: :func:`write_adapter`
writes a standard LoRA directory (scale 1) atomically. Example::

    src = open_adapter("adapters/snli")                 # or "org/name@rev" on the Hub
    f = load_factors(src, "model.layers.0.self_attn.q_proj")
    f.delta()                                           # == PEFT's get_delta_weight (out, in)

PEFT facts reproduced here (peft 0.21):
- keys: ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), adapter
  name stripped; the same layout with ``fan_in_fan_out`` (GPT-2 Conv1D), where PEFT transposes
  ``B @ A`` only when it adds it to the (in, out) Conv1D weight.
- scale: ``lora_alpha / r`` or ``lora_alpha / sqrt(r)`` (use_rslora), r and alpha per module from
  ``rank_pattern`` / ``alpha_pattern`` (see :func:`pattern_key`).
- VeRA: shared ``base_model.vera_A`` (r, max_in), ``base_model.vera_B`` (max_out, r) and per module
  ``vera_lambda_d`` (r,), ``vera_lambda_b`` (out,); delta = (λ_b ⊙ vera_B[:out]) @ (λ_d ⊙ vera_A[:, :in]).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import Tensor

from coremerge import hub
from coremerge.errors import AdapterError
from coremerge.types import LoraFactors, LowRank, StoredLowRank

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
REPORT_NAME = "merge_report.json"
PREFIX = "base_model.model."
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"

_ST_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

# LoraConfig fields that change the forward away from x @ (scale * B @ A)^T, or whose weights we cannot
# merge exactly: refused whenever set (truthy). velora_config is NOT here: VeLoRA changes only the backward
# pass (its saved lora_velora_embed buffers are training state and are skipped). init_lora_weights is
# checked separately (PiSSA & co. leave an adapter relative to a modified base model).
_REFUSED_LORA_FIELDS = {
    "use_dora": "DoRA (use_dora) rescales each output by a learned magnitude: not a low-rank update",
    "lora_bias": "lora_bias adds a trained bias to lora_B: not a low-rank update",
    "use_qalora": "QALoRA (use_qalora) pools the input before lora_A",
    "alora_invocation_tokens": "aLoRA applies the update only after its invocation tokens",
    "arrow_config": "Arrow routes tokens between several adapters",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
    "monteclora_config": "MonteCLoRA samples perturbations of lora_A",
    "kasa_config": "KaSA truncates the base weight and learns a diagonal between A and B",
    "megatron_config": "Megatron tensor-parallel LoRA layers are not supported",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not a linear-layer update",
    "trainable_token_indices": "trainable_token_indices saves trained embedding rows",
}
_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_KNOWN_FIELDS = {  # peft 0.21 PeftConfig + LoraConfig + VeraConfig fields, and harmless legacy ones
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "velora_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
    "projection_prng_key", "save_projection", "vera_dropout", "d_initial", "init_weights",
    "enable_lora", "merge_weights", *_REFUSED_LORA_FIELDS,
}


@dataclass(frozen=True)
class ModuleSpec:
    """One adapted module of one adapter, as found in its files (no tensor data)."""

    name: str  # module path inside the base model, as PEFT's rank_pattern sees it
    a_key: str  # tensor key of A (VeRA: the lambda_d key)
    b_key: str  # tensor key of B (VeRA: the lambda_b key)
    rank: int
    out_features: int  # m
    in_features: int  # n
    scale: float  # folded into b by load_factors (1.0 for VeRA)
    kind: str  # "lora" | "vera"


@dataclass(frozen=True)
class AdapterSource:
    """A validated adapter directory: what :func:`open_adapter` returns and :func:`load_factors` reads.

    Plain data (picklable, for Ray and multiprocessing); treat ``config`` and ``modules`` as read-only.
    """

    name: str  # what the user gave (path or hub id), used in every error message
    path: Path  # local directory
    config: Mapping[str, Any]
    weights_file: Path  # adapter_model.safetensors, or adapter_model.bin (legacy)
    dtype: torch.dtype  # of the stored tensors
    modules: Mapping[str, ModuleSpec]  # sorted by name
    peft_type: str  # "LORA" | "VERA"


# ---------------------------------------------------------------------------------------------- patterns
def pattern_key(patterns: Sequence[str], module: str) -> str:
    """PEFT's ``get_pattern_key`` (peft.utils.other), reproduced exactly.

    The FIRST pattern, in the config's (JSON) order, that matches wins; a pattern p matches when
    ``re.match(rf"(.*\\.)?({p})$", module)``: p is a regex that must match a whole dotted suffix of the
    module path. When none matches, the module name itself is returned (then looked up verbatim).

    Example:
        >>> pattern_key(["layers.0.self_attn.q_proj", "q_proj"], "model.layers.0.self_attn.q_proj")
        'layers.0.self_attn.q_proj'
        >>> pattern_key(["q_proj", "layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj")
        'q_proj'
        >>> pattern_key(["proj"], "model.layers.0.self_attn.q_proj")  # not a whole dotted suffix
        'model.layers.0.self_attn.q_proj'
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def resolve_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) of ``module`` as PEFT's LoraModel resolves them (defaults r=8, alpha=8 as in LoraConfig)."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(pattern_key(list(rank_pattern), module), config.get("r", 8))
    alpha = alpha_pattern.get(pattern_key(list(alpha_pattern), module), config.get("lora_alpha", 8))
    return r, alpha


def lora_scale(config: Mapping[str, Any], module: str) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with use_rslora, for ``module`` (patterns resolved)."""
    r, alpha = resolve_rank_alpha(config, module)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ----------------------------------------------------------------------------------------------- reading
def open_adapter(spec: str | os.PathLike, *, vera_in_features: Mapping[str, int] | None = None) -> AdapterSource:
    """Open and validate a PEFT LoRA/VeRA adapter (a directory or a Hub id ``org/name[@rev]``).

    Reads ``adapter_config.json`` and the weights file's header only. Raises :class:`AdapterError` for
    anything that cannot be merged exactly (see the module docstring and ``_REFUSED_LORA_FIELDS``).

    VeRA stores only the largest in_features of its targets (vera_A is (r, max_in)); every VeRA module
    is read with in_features = max_in unless ``vera_in_features`` gives it ({module: n}). That is exact
    when all targeted modules share in_features (q/k/v/gate/up of a Llama).

    Example:
        >>> src = open_adapter("adapters/snli")                      # doctest: +SKIP
        >>> src.modules["model.layers.0.self_attn.q_proj"].scale     # doctest: +SKIP
        2.0
    """
    name = os.fspath(spec)
    path = hub.resolve(name)
    config = _read_config(path, name)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "VERA"):
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type!r} is not supported; expected 'LORA' or 'VERA'")
    _check_config(config, name)
    weights_file = path / SAFETENSORS_NAME
    if not weights_file.is_file():
        weights_file = path / BIN_NAME
        if not weights_file.is_file():
            raise AdapterError(f"adapter {name!r}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in {path}")
    header = _read_header(weights_file, name)
    if peft_type == "LORA":
        modules = _lora_modules(header, config, name)
    else:
        modules = _vera_modules(header, config, name, vera_in_features or {})
    if not modules:
        raise AdapterError(f"adapter {name!r}: {weights_file.name} holds no {peft_type} module tensors")
    used = {k for s in modules.values() for k in (s.a_key, s.b_key)} | ({VERA_A_KEY, VERA_B_KEY} & set(header))
    dtypes = {header[k][0] for k in used}
    dtype = functools.reduce(torch.promote_types, sorted(dtypes, key=str))
    return AdapterSource(name=name, path=path, config=config, weights_file=weights_file, dtype=dtype,
                         modules=dict(sorted(modules.items())), peft_type=peft_type)


def _read_config(path: Path, name: str) -> dict[str, Any]:
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"adapter {name!r}: no {CONFIG_NAME} in {path}; expected a PEFT adapter directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: {CONFIG_NAME} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {name!r}: {CONFIG_NAME} must hold a JSON object, got {type(config).__name__}")
    return config


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", 0) and not (isinstance(value, (dict, list)) and not value)


def _check_config(config: Mapping[str, Any], name: str) -> None:
    """Refuse LoRA variants and settings that cannot be merged as x @ (scale * B @ A)^T."""
    where = f"adapter {name!r}: {CONFIG_NAME}:"
    for key, value in config.items():
        if key not in _KNOWN_FIELDS and (value is True or (isinstance(value, (dict, list)) and value)):
            raise AdapterError(f"{where} unknown field {key}={json.dumps(value)} (a newer PEFT?); coremerge cannot "
                               f"tell whether it changes the adapter's forward, so it refuses to merge it")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where} bias={config['bias']!r} trains base-model biases; expected bias 'none'")
    if config["peft_type"] == "VERA":
        if not config.get("save_projection", True):
            raise AdapterError(f"{where} VeRA adapter saved without its projections (save_projection=false); "
                               f"re-save it with save_projection=True")
        _check_positive_int(config.get("r", 256), f"{where} r")
        return
    for field_name, why in _REFUSED_LORA_FIELDS.items():
        if _is_set(config.get(field_name)):
            raise AdapterError(f"{where} {field_name}={json.dumps(config[field_name])}: {why}; cannot merge exactly")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_MUTATING_INITS):
        raise AdapterError(f"{where} init_lora_weights={init!r}: the adapter is relative to a base model modified by "
                           f"that initialisation; re-save it with save_pretrained(..., "
                           f"path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter")
    _check_positive_int(config.get("r", 8), f"{where} r")
    _check_number(config.get("lora_alpha", 8), f"{where} lora_alpha")
    for pattern_field, check in (("rank_pattern", _check_positive_int), ("alpha_pattern", _check_number)):
        patterns = config.get(pattern_field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where} {pattern_field} must be an object {{pattern: value}}, got {patterns!r}")
        for key, value in patterns.items():
            check(value, f"{where} {pattern_field}[{key!r}]")
            try:
                re.compile(key)
            except re.error as exc:
                raise AdapterError(f"{where} {pattern_field} key {key!r} is not a valid regex ({exc})") from exc


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdapterError(f"{what} must be a positive integer, got {value!r}")


def _check_number(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{what} must be a finite number, got {value!r}")


def _read_header(path: Path, name: str) -> dict[str, tuple[torch.dtype | str, tuple[int, ...]]]:
    """{key: (dtype, shape)} of a weights file, reading no tensor data (safetensors) and checking its size."""
    if path.name == BIN_NAME:
        return {k: (t.dtype, tuple(t.shape)) for k, t in _load_bin(path, name).items()}
    where = f"adapter {name!r}: {path.name}"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= n <= size - 8:
                raise AdapterError(f"{where}: header length {n} does not fit a file of {size} bytes; the file is "
                                   f"truncated or not safetensors")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out, end = {}, 0
        for key, info in header.items():
            dtype, shape, (begin, stop) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if dtype not in _ST_ITEMSIZE or stop - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
                raise AdapterError(f"{where}: tensor {key!r} header entry is inconsistent ({info})")
            out[key] = (_ST_FLOATS.get(dtype, dtype), shape)
            end = max(end, stop)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, AdapterError):
            raise
        raise AdapterError(f"{where}: corrupt safetensors header ({type(exc).__name__}: {exc})") from exc
    if 8 + n + end != size:
        raise AdapterError(f"{where}: the header describes {8 + n + end} bytes but the file has {size}; the file is "
                           f"truncated or corrupt")
    try:  # the reader we use later must agree
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{where}: safetensors cannot open it ({exc})") from exc
    if keys != set(out):
        raise AdapterError(f"{where}: corrupt safetensors header (keys disagree with the safetensors reader)")
    return out


@functools.lru_cache(maxsize=4)
def _load_bin_cached(path: str, mtime_ns: int, size: int) -> dict[str, Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # pre-zipfile format: no mmap


def _load_bin(path: Path, name: str) -> dict[str, Tensor]:
    """A legacy adapter_model.bin, only ever through torch.load(weights_only=True): never unpickle code."""
    stat = path.stat()
    try:
        state = _load_bin_cached(str(path), stat.st_mtime_ns, stat.st_size)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...
        raise AdapterError(f"adapter {name!r}: {path.name} cannot be read with torch.load(weights_only=True) "
                           f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise AdapterError(f"adapter {name!r}: {path.name} must hold a dict of tensors")
    return state


def _unexpected(key: str, config: Mapping[str, Any], name: str, expected: str) -> None:
    modules_to_save = config.get("modules_to_save") or []
    rest = key.removeprefix(PREFIX)
    if any(re.search(rf"(^|\.){re.escape(m)}\.", rest) for m in modules_to_save):
        raise AdapterError(f"adapter {name!r}: tensor {key!r} is a full weight saved by modules_to_save="
                           f"{list(modules_to_save)}; merging trained copies of whole modules is not supported")
    raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r}; expected only {expected}")


def _check_float(dtype: Any, where: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AdapterError(f"{where} has dtype {dtype}; expected float64, float32, float16 or bfloat16")


def _lora_modules(header: Mapping[str, tuple[Any, tuple[int, ...]]], config: Mapping[str, Any],
                  name: str) -> dict[str, ModuleSpec]:
    keys: dict[str, dict[str, str]] = {}
    ambiguous: list[str] = []
    specific = (".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".lora_B.bias")
    for key in sorted(header, key=lambda k: not k.endswith(specific)):  # the most telling refusal first
        rest = key.removeprefix(PREFIX)
        if rest == key:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r}; expected keys starting with {PREFIX!r}")
        if rest.endswith((".lora_A.weight", ".lora_B.weight")):
            module, slot = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
            keys.setdefault(module, {})[slot] = key
        elif rest.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise AdapterError(f"adapter {name!r}: module {rest.rsplit('.', 1)[0]!r} is an embedding LoRA; only "
                               f"LoRA on linear layers is supported (retrain without it in target_modules)")
        elif rest.endswith(".lora_velora_embed") and _is_set(config.get("velora_config")):
            continue  # VeLoRA's training-time activation compression state
        elif rest.endswith(".lora_magnitude_vector"):
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is a DoRA magnitude; DoRA cannot be merged exactly")
        elif rest.endswith(".lora_B.bias"):
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is a lora_B bias (lora_bias); cannot merge exactly")
        else:
            _unexpected(key, config, name, "*.lora_A.weight and *.lora_B.weight")
    modules = {}
    for module, pair in sorted(keys.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise AdapterError(f"adapter {name!r}: module {module!r} has no {missing}.weight tensor")
        (a_dtype, a_shape), (b_dtype, b_shape) = header[pair["A"]], header[pair["B"]]
        where = f"adapter {name!r}: module {module!r}:"
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(f"{where} lora_A {list(a_shape)} / lora_B {list(b_shape)} are not matrices (a conv "
                               f"LoRA?); only LoRA on linear layers is supported")
        _check_float(a_dtype, f"{where} lora_A")
        _check_float(b_dtype, f"{where} lora_B")
        r, n = a_shape
        m = b_shape[0]
        if b_shape[1] != r or r < 1:
            raise AdapterError(f"{where} lora_A is {r}x{n} and lora_B is {b_shape[0]}x{b_shape[1]}; expected lora_B "
                               f"(out, r) and lora_A (r, in) with the same r >= 1")
        expected_r, _ = resolve_rank_alpha(config, module)
        if r != expected_r:
            raise AdapterError(f"{where} stored rank {r} but the config (r / rank_pattern) gives {expected_r}"
                               f"{_order_hint(config.get('rank_pattern') or {}, module)}")
        if _order_hint(config.get("alpha_pattern") or {}, module):
            ambiguous.append(module)
        modules[module] = ModuleSpec(name=module, a_key=pair["A"], b_key=pair["B"], rank=r, out_features=m,
                                     in_features=n, scale=lora_scale(config, module), kind="lora")
    if ambiguous:
        log.warning("adapter %r: %d modules (e.g. %r) match several alpha_pattern keys with different alphas; "
                    "using the first in adapter_config.json, as PEFT does when it loads the adapter (PEFT saves the "
                    "keys sorted, so the order used in training may have differed)", name, len(ambiguous), ambiguous[0])
    return modules


def _order_hint(patterns: Mapping[str, Any], module: str) -> str:
    """A note when several pattern keys with different values match ``module`` (their order decides)."""
    matching = [key for key in patterns if re.match(rf"(.*\.)?({key})$", module)]
    if len({json.dumps(patterns[k]) for k in matching}) < 2:
        return ""
    return (f" (keys {matching} all match it and the first in adapter_config.json wins; PEFT saves them sorted, so "
            f"the order used in training is lost and PEFT itself cannot load this adapter)")


def _vera_modules(header: Mapping[str, tuple[Any, tuple[int, ...]]], config: Mapping[str, Any], name: str,
                  in_overrides: Mapping[str, int]) -> dict[str, ModuleSpec]:
    if VERA_A_KEY not in header or VERA_B_KEY not in header:
        raise AdapterError(f"adapter {name!r}: VeRA projections {VERA_A_KEY} / {VERA_B_KEY} are missing from the "
                           f"weights; re-save with save_projection=True")
    (va_dtype, va), (vb_dtype, vb) = header[VERA_A_KEY], header[VERA_B_KEY]
    _check_float(va_dtype, f"adapter {name!r}: {VERA_A_KEY}")
    _check_float(vb_dtype, f"adapter {name!r}: {VERA_B_KEY}")
    r = config.get("r", 256)
    if len(va) != 2 or len(vb) != 2 or va[0] != r or vb[1] != r:
        raise AdapterError(f"adapter {name!r}: VeRA projections vera_A {list(va)} / vera_B {list(vb)}; expected "
                           f"({r}, max_in) and (max_out, {r}) for r={r}")
    keys: dict[str, dict[str, str]] = {}
    for key in header:
        rest = key.removeprefix(PREFIX)
        if key in (VERA_A_KEY, VERA_B_KEY):
            continue
        if rest != key and rest.endswith((".vera_lambda_b", ".vera_lambda_d")):
            keys.setdefault(rest[: -len(".vera_lambda_b")], {})[rest[-1]] = key
        else:
            _unexpected(key, config, name, "the VeRA projections and *.vera_lambda_b / *.vera_lambda_d")
    modules = {}
    for module, pair in sorted(keys.items()):
        where = f"adapter {name!r}: module {module!r}:"
        if set(pair) != {"b", "d"}:
            raise AdapterError(f"{where} has no vera_lambda_{'d' if 'b' in pair else 'b'} tensor")
        (b_dtype, b_shape), (d_dtype, d_shape) = header[pair["b"]], header[pair["d"]]
        _check_float(b_dtype, f"{where} vera_lambda_b")
        _check_float(d_dtype, f"{where} vera_lambda_d")
        if len(b_shape) != 1 or len(d_shape) != 1 or d_shape[0] != r or b_shape[0] > vb[0]:
            raise AdapterError(f"{where} vera_lambda_b {list(b_shape)} / vera_lambda_d {list(d_shape)}; expected "
                               f"(out <= {vb[0]},) and ({r},)")
        n = in_overrides.get(module, va[1])
        if not 1 <= n <= va[1]:
            raise AdapterError(f"{where} in_features {n} does not fit vera_A's {va[1]} columns")
        modules[module] = ModuleSpec(name=module, a_key=pair["d"], b_key=pair["b"], rank=r, out_features=b_shape[0],
                                     in_features=n, scale=1.0, kind="vera")
    return modules


@contextmanager
def _tensor_reader(src: AdapterSource) -> Iterator[Callable[..., Tensor]]:
    """``get(key, rows=None, cols=None)``: a tensor (or its leading rows/columns) from the weights file."""
    if src.weights_file.name == BIN_NAME:
        state = _load_bin(src.weights_file, src.name)

        def get_bin(key: str, rows: int | None = None, cols: int | None = None) -> Tensor:
            t = state[key]
            return t[:rows] if cols is None else t[:rows, :cols]

        yield get_bin
        return
    try:
        start, entries, _ = _index(src.weights_file)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {src.name!r}: {src.weights_file.name} cannot be opened ({exc})") from exc

    def get_st(key: str, rows: int | None = None, cols: int | None = None) -> Tensor:
        try:
            t = _read_entry(src.weights_file, start, entries[key])
        except OSError as exc:
            raise AdapterError(f"adapter {src.name!r}: {src.weights_file.name}: cannot read tensor {key!r} ({exc})") from exc
        return t if rows is None and cols is None else (t[:rows] if cols is None else t[:rows, :cols])

    yield get_st


@functools.lru_cache(maxsize=64)
def _safetensors_index(path: str, size: int, mtime_ns: int, inode: int) -> tuple[int, dict[str, tuple], dict[str, str]]:
    """(where the data starts, {key: (torch dtype, shape, begin, end)}, metadata) of a safetensors file,
    per version of the file: its header is parsed once, not once per module (a 1B merge reads 112
    modules from each adapter). open_adapter has checked an adapter's header against the file and
    safetensors' own reader; the pipeline's shard files are checked against their sha256 first."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    return 8 + n, {key: (_ST_FLOATS[info["dtype"]], tuple(int(d) for d in info["shape"]), *info["data_offsets"])
                   for key, info in header.items() if info["dtype"] in _ST_FLOATS}, metadata


def _index(path: str | os.PathLike) -> tuple[int, dict[str, tuple], dict[str, str]]:
    """:func:`_safetensors_index` of the file's current version."""
    return _safetensors_index(str(path), *_file_version(Path(path)))


def safetensors_index(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """({key: shape} of a safetensors file's float tensors, its metadata), from its header alone."""
    _, entries, metadata = _index(path)
    return {key: entry[1] for key, entry in entries.items()}, dict(metadata)


def read_tensors(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Tensor]:
    """Tensors of a safetensors file, each read with one read() into memory of its own (nothing stays
    mapped); the header is parsed once per version of the file."""
    start, entries, _ = _index(path)
    return {key: _read_entry(Path(path), start, entries[key]) for key in keys}


def _read_entry(path: Path, start: int, entry: tuple) -> Tensor:
    """One tensor of a safetensors file from its :func:`_safetensors_index` entry."""
    dtype, shape, begin, stop = entry
    return _read_span(path, start + begin, stop - begin, dtype, shape)


def _read_span(path: Path, offset: int, size: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """``size`` bytes at ``offset`` of a file as a tensor: one read into fresh memory, so nothing of the
    file stays mapped into the process (a 70B adapter set would otherwise count in its RSS)."""
    if sys.byteorder != "little":
        raise OSError("reading safetensors files needs a little-endian machine")
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view, done = memoryview(buffer), 0
        while done < size:
            got = f.readinto(view[done:])
            if not got:
                raise OSError(f"{path} ended {size - done} bytes early (changed while it was read?)")
            done += got
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite (exact, for any float dtype)."""
    # A finite sum means no element is NaN or ±Inf (both propagate), and summing is 6-15x faster
    # than isfinite(t).all() on a CPU (float32 accumulation: 5-8x faster again than float64 for
    # bf16/f16). A non-finite sum (NaN/Inf, or finite values whose sum overflows) gets the exact check.
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return math.isfinite(float(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def load_factors(src: AdapterSource, module: str, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> LoraFactors:
    """One module's factors with the adapter's scale folded into ``b`` once: ``delta = b @ a`` (out, in).

    Reads just that module's tensors. NaN/Inf in a stored tensor (or after folding) is an AdapterError.

    Example:
        >>> f = load_factors(open_adapter("adapters/snli"), "model.layers.0.self_attn.q_proj")  # doctest: +SKIP
        >>> f.a.shape, f.b.shape                                                           # doctest: +SKIP
        (torch.Size([16, 4096]), torch.Size([4096, 16]))
    """
    spec = src.modules.get(module)
    if spec is None:
        raise AdapterError(f"adapter {src.name!r}: has no module {module!r}")
    copy = src.weights_file.name == BIN_NAME  # never hand out the cached .bin tensors themselves

    def finite(t: Tensor, key: str) -> Tensor:
        t = t.to(device=device, dtype=dtype, copy=copy)
        if not all_finite(t):
            raise AdapterError(f"adapter {src.name!r}: module {module!r}: tensor {key!r} contains NaN or Inf")
        return t

    with _tensor_reader(src) as get:
        if spec.kind == "lora":
            a = finite(get(spec.a_key), spec.a_key)  # (r, n)
            b = finite(get(spec.b_key), spec.b_key) * spec.scale  # (m, r)
        else:  # VeRA, sliced as peft.tuners.vera.layer.Linear.forward slices the shared projections
            lambda_d = finite(get(spec.a_key), spec.a_key)  # (r,)
            lambda_b = finite(get(spec.b_key), spec.b_key)  # (m,)
            vera_a = finite(get(VERA_A_KEY, None, spec.in_features), VERA_A_KEY)  # (r, n)
            vera_b = finite(get(VERA_B_KEY, spec.out_features), VERA_B_KEY)  # (m, r)
            a = lambda_d[:, None] * vera_a  # (r, n)
            b = lambda_b[:, None] * vera_b  # (m, r)
    if not all_finite(b):
        raise AdapterError(f"adapter {src.name!r}: module {module!r}: {spec.b_key!r} times scale {spec.scale} "
                           f"overflows {dtype}")
    return LoraFactors(a=a, b=b)


def check_compatible(sources: Sequence[AdapterSource]) -> None:
    """Refuse adapters that cannot be merged together: a module with different (out, in) shapes in two
    adapters, different fan_in_fan_out, or no module at all."""
    if not sources:
        raise AdapterError("no adapters given; name at least one adapter directory or hub id")
    first = sources[0]
    for src in sources[1:]:
        if bool(src.config.get("fan_in_fan_out")) != bool(first.config.get("fan_in_fan_out")):
            raise AdapterError(f"adapters {first.name!r} and {src.name!r}: fan_in_fan_out is "
                               f"{bool(first.config.get('fan_in_fan_out'))} in the first and "
                               f"{bool(src.config.get('fan_in_fan_out'))} in the second; they target different "
                               f"layer types (Linear vs Conv1D), so different base models")
    seen: dict[str, tuple[AdapterSource, ModuleSpec]] = {}
    for src in sources:
        for module, spec in src.modules.items():
            if module not in seen:
                seen[module] = (src, spec)
                continue
            other, o = seen[module]
            if (o.out_features, o.in_features) != (spec.out_features, spec.in_features):
                hint = ("; a VeRA adapter stores only its largest in_features, pass vera_in_features to open_adapter"
                        if "vera" in (o.kind, spec.kind) and o.out_features == spec.out_features else "")
                raise AdapterError(f"adapters {other.name!r} and {src.name!r}: module {module!r} is "
                                   f"{o.out_features}x{o.in_features} in the first and {spec.out_features}x"
                                   f"{spec.in_features} in the second (out x in); expected the same base model{hint}")
    if not seen:
        raise AdapterError(f"adapters {[s.name for s in sources]}: no module to merge")


def union_modules(sources: Sequence[AdapterSource]) -> list[str]:
    """Sorted union of the adapters' module names (an adapter lacking a module sits out its merge)."""
    return sorted(set().union(*(src.modules for src in sources)))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_KNOWN: OrderedDict[str, tuple[tuple[int, int, int], str]] = OrderedDict()  # path -> (version, sha256)
_KNOWN_MAX = 65536  # ~10 MB of entries: a 70B sweep's shard files
_KNOWN_LOCK = threading.Lock()  # writers run in threads (the pipeline writes two shard files at a time)


def _file_version(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino


def remember_sha256(path: str | os.PathLike, sha: str, version: tuple[int, int, int] | None = None) -> None:
    """Note that ``path`` (whole and closed; as of ``version``, default now) hashes to ``sha``."""
    path = Path(path)
    key, version = str(path.resolve()), version or _file_version(path)
    with _KNOWN_LOCK:
        _KNOWN[key] = (version, sha)
        _KNOWN.move_to_end(key)
        while len(_KNOWN) > _KNOWN_MAX:
            _KNOWN.popitem(last=False)


def known_sha256(path: str | os.PathLike) -> str:
    """:func:`file_sha256`, read and computed once per version of the file in a process.

    A version is the file's size, modification time and inode (what build tools trust too). A
    file this process wrote (:func:`write_adapter`, the pipeline's shard files) was hashed as it
    was written and is not read back; a sweep's 16 merge reports hash their 4 input files once,
    not 16 times. Raises OSError if the file is missing.
    """
    path = Path(path)
    key, version = str(path.resolve()), _file_version(path)
    with _KNOWN_LOCK:
        seen = _KNOWN.get(key)
    if seen is not None and seen[0] == version:
        return seen[1]
    sha = file_sha256(path)
    if _file_version(path) == version:  # not changed while it was read
        remember_sha256(path, sha, version)
    return sha


# ----------------------------------------------------------------------------------------------- writing
def _module_pattern(module: str) -> str:
    """A rank_pattern key that matches exactly this module under :func:`pattern_key` and nothing else."""
    return "^" + re.escape(module)


def _agreed(sources: Sequence[AdapterSource], key: str) -> Any:
    values = {json.dumps(src.config.get(key), sort_keys=True) for src in sources}
    return sources[0].config.get(key) if len(values) == 1 else None


def adapter_config_for(sources: Sequence[AdapterSource], ranks: Mapping[str, int]) -> dict[str, Any]:
    """The merged adapter's ``adapter_config.json``: a plain LoRA (scale 1 everywhere) that PEFT loads.

    ``r`` = the most common rank (ties: the larger), ``lora_alpha = r``; modules of another rank get
    exact ``rank_pattern`` / ``alpha_pattern`` entries ``"^<escaped module path>": rank``. A rank of 0 (an
    all-zero update) is written as rank 1 of zeros, as :func:`write_adapter` does.

    Example:
        >>> cfg = adapter_config_for(sources, {"model.layers.0.self_attn.q_proj": 32})  # doctest: +SKIP
        >>> cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"]                            # doctest: +SKIP
        (32, 32, {})
    """
    if not sources or not ranks:
        raise ValueError("adapter_config_for needs at least one adapter and one merged module")
    ranks = {module: max(1, int(rank)) for module, rank in sorted(ranks.items())}
    r = max(Counter(ranks.values()).items(), key=lambda kv: (kv[1], kv[0]))[0]
    patterns = {_module_pattern(m): k for m, k in ranks.items() if k != r}
    fan_in_fan_out = {bool(src.config.get("fan_in_fan_out")) for src in sources}
    if len(fan_in_fan_out) != 1:
        raise AdapterError(f"adapters {[s.name for s in sources]}: fan_in_fan_out differs; cannot write one config")
    targets = [src.config.get("target_modules") for src in sources]
    simple = all(isinstance(t, list) for t in targets) and not any(
        _is_set(src.config.get(k)) for src in sources
        for k in ("layers_to_transform", "layers_pattern", "exclude_modules"))
    union = sorted(set().union(*targets)) if simple else []
    if not simple or not all(any(m == t or m.endswith("." + t) for t in union) for m in ranks):
        union = list(ranks)  # the exact module list: PEFT matches full names exactly
    return {
        "peft_type": "LORA", "task_type": _agreed(sources, "task_type"),
        "base_model_name_or_path": _agreed(sources, "base_model_name_or_path"),
        "revision": _agreed(sources, "revision"), "inference_mode": True,
        "r": r, "lora_alpha": r, "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "target_modules": union, "use_rslora": False, "use_dora": False, "lora_bias": False,
        "fan_in_fan_out": fan_in_fan_out.pop(), "bias": "none", "lora_dropout": 0.0, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
    }


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# safetensors' names for the dtypes a merged adapter can be written in.
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _tensor_layout(modules: Mapping[str, LowRank | StoredLowRank],
                   config: Mapping[str, Any]) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """tensor name -> (module, part, shape) for every tensor of the merged adapter, checked against ``config``."""
    layout: dict[str, tuple[str, str, tuple[int, int]]] = {}
    for module, lr in modules.items():
        rank = max(lr.rank, 1)  # PEFT needs r >= 1: an all-zero update is written as one zero rank
        r, _ = resolve_rank_alpha(config, module)
        if r != rank or abs(lora_scale(config, module) - 1.0) > 1e-12:
            raise ValueError(f"module {module!r}: rank {rank} but the config gives rank {r} and scale "
                             f"{lora_scale(config, module)}; build the config with adapter_config_for")
        layout[f"{PREFIX}{module}.lora_A.weight"] = (module, "lora_A", (rank, lr.in_features))
        layout[f"{PREFIX}{module}.lora_B.weight"] = (module, "lora_B", (lr.out_features, rank))
    return layout


def _module_tensors(module: str, lr: LowRank, dtype: torch.dtype) -> dict[str, Tensor]:
    """The two tensors of one merged module as written: cpu, ``dtype``, contiguous, finite."""
    a, b = lr.a, lr.b  # (q, n), (m, q)
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"module {module!r}: a {list(a.shape)} and b {list(b.shape)} are not (q, n) and (m, q)")
    if a.shape[0] == 0:
        a, b = a.new_zeros(1, a.shape[1]), b.new_zeros(b.shape[0], 1)
    out = {}
    for part, t in (("lora_A", a), ("lora_B", b)):
        t = t.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
        if not all_finite(t):  # in the written dtype: a float16 cast can overflow
            raise ValueError(f"module {module!r}: merged {part} has NaN or Inf in {dtype}")
        out[part] = t
    return out


def safetensors_header(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """The first bytes of a single-dtype safetensors file, as ``safetensors.torch.save`` writes them.

    An 8-byte little-endian length, then the JSON header (``__metadata__`` first, then each tensor's
    dtype, shape and data offsets, in sorted name order) padded with spaces to a multiple of 8. The
    tensors' bytes follow in sorted name order.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(shapes):
        size = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t: Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as they lie in memory, which is safetensors' layout (little-endian)."""
    if sys.byteorder != "little":
        raise OSError("writing safetensors files needs a little-endian machine")
    # reshape(-1): a contiguous tensor with a last dimension of size 1 may have any stride there
    return t.reshape(-1).view(torch.uint8).numpy().data


def _save_streamed(path: Path, modules: Mapping[str, LowRank | StoredLowRank],
                   layout: Mapping[str, tuple[str, str, tuple[int, int]]], dtype: torch.dtype,
                   metadata: Mapping[str, str]) -> str:
    """Write a safetensors file one module at a time, byte for byte what ``safetensors.torch.save_file`` writes
    (:func:`safetensors_header`, then the tensors' bytes in name order); returns the sha256 of the bytes
    written (hashed on the way out: the file is not read back). Only one module's tensors are in memory
    at a time (tests/test_peft_io.py compares the bytes with save_file's).
    """
    names = sorted(layout)

    def chunks() -> Iterator[bytes | memoryview]:
        yield safetensors_header({name: layout[name][2] for name in names}, dtype, metadata)
        loaded: tuple[str, dict[str, Tensor]] | None = None  # the module in hand (its A and B are neighbours)
        for name in names:
            module, part, shape = layout[name]
            if loaded is None or loaded[0] != module:
                loaded = (module, _module_tensors(module, modules[module].load(), dtype))
            t = loaded[1][part]
            if tuple(t.shape) != shape:
                raise ValueError(f"module {module!r}: {part} has shape {list(t.shape)}, expected {list(shape)}")
            yield tensor_bytes(t)

    with open(path, "wb") as f:
        return write_hashed(f, chunks())[0]


def write_hashed(f: BinaryIO, chunks: Iterable[bytes | memoryview]) -> tuple[str, int]:
    """Write ``chunks`` to the open file ``f``, hashing them on the way out; (sha256, bytes written)."""
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        f.write(chunk)
        digest.update(chunk)
        size += memoryview(chunk).nbytes
    return digest.hexdigest(), size


def write_adapter(out_dir: str | os.PathLike, modules: Mapping[str, LowRank | StoredLowRank], *, config: dict,
                  report: dict | None, dtype: torch.dtype, force: bool = False) -> Path:
    """Write a PEFT LoRA adapter directory atomically; returns its path.

    Everything is written into a temporary directory next to ``out_dir`` and renamed into place, so
    ``out_dir`` is either absent/untouched or complete. An existing ``out_dir`` is refused unless
    ``force``; with ``force`` it is replaced only after the new one is complete, and only if it looks
    like an adapter directory (empty or holding adapter_config.json). Same inputs, same bytes.
    ``modules`` may hold :class:`StoredLowRank` entries: they are loaded one at a time while the
    weights file is written, so the merged adapter never has to fit in memory all at once.

    Example:
        >>> write_adapter("merged/", merged, config=adapter_config_for(srcs, ranks), report=None,
        ...               dtype=torch.bfloat16)                                # doctest: +SKIP
    """
    out = Path(out_dir)
    if os.path.lexists(out):
        if not force:
            raise ValueError(f"output directory {out} exists; pass --force to overwrite it")
        if not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_NAME).is_file()):
            raise ValueError(f"output directory {out} exists and is not an adapter directory (no {CONFIG_NAME}); "
                             f"refusing to replace it even with --force")
    if not modules:
        raise ValueError("no merged modules to write")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"cannot write an adapter in {dtype}; expected one of {list(_SAFETENSORS_DTYPES)}")
    layout = _tensor_layout(modules, config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        sha = _save_streamed(tmp / SAFETENSORS_NAME, modules, layout, dtype, {"format": "pt"})
        (tmp / CONFIG_NAME).write_bytes(_json_bytes(config))
        if report is not None:
            (tmp / REPORT_NAME).write_bytes(_json_bytes(report))
        for f in tmp.iterdir():
            _fsync(f)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remember_sha256(out / SAFETENSORS_NAME, sha)  # renaming the directory kept the file's inode and mtime
    log.info("wrote %d modules to %s", len(modules), out)
    return out


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and deleted only afterwards."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rmdir(old)
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)
