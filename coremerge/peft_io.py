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
- targets: a module with tensors must be one PEFT adapts (``check_target_module_exists``: target_modules,
  exclude_modules, modules_to_save, layers_to_transform / layers_pattern); PEFT would drop the others.

Untrusted input. Adapter files come from anyone: every problem is ONE :class:`AdapterError` line. The
bytes of safetensors files are read and checked by :mod:`coremerge.safetensors_file` (no PEFT meaning
there); the regexes of a config (rank_pattern, alpha_pattern, target_modules, ...) are matched in
bounded time (:mod:`coremerge.peft_rules`). The version of the weights file whose header was checked is
kept (:attr:`AdapterSource.weights_version`): every later read must find that very version, so nothing
is built from, or reported as, a file other than the one opened (:func:`weights_sha256`).
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from coremerge import hub
from coremerge.errors import AdapterChangedError, AdapterError
from coremerge.paths import OutputPathError, existing_ancestor
from coremerge.peft_rules import (  # noqa: F401 (re-exported)
    ConfigRules, PatternIndex, PatternMatcher, lora_scale, pattern_key, resolve_rank_alpha)
from coremerge.safetensors_file import (  # noqa: F401 (re-exported: the pipeline and tests import them from here)
    _KNOWN, FLOAT_DTYPES, FileVersion, file_sha256, known_sha256, open_expected, open_regular, open_safetensors,
    read_capped, read_tensors, remember_sha256, safetensors_header, safetensors_index, show, tensor_bytes,
    version_sha256, write_hashed)
from coremerge.safetensors_file import SAFETENSORS_DTYPES as _SAFETENSORS_DTYPES
from coremerge.types import LoraFactors, LowRank, StoredLowRank

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
REPORT_NAME = "merge_report.json"
PREFIX = "base_model.model."
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"

CONFIG_MAX_BYTES = 16 << 20  # adapter_config.json: kilobytes in practice, megabytes with huge rank_patterns
CONFIG_MAX_DEPTH = 32  # JSON nesting of adapter_config.json (PEFT's own configs nest 3 deep)

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
    weights_version: FileVersion  # of weights_file, when its header was read: every later read must find it
    config_sha256: str  # of the adapter_config.json bytes parsed into ``config``


# ----------------------------------------------------------------------------------------------- reading
def open_adapter(spec: str | os.PathLike, *, vera_in_features: Mapping[str, int] | None = None) -> AdapterSource:
    """Open and validate a PEFT LoRA/VeRA adapter (a directory or a Hub id ``org/name[@rev]``).

    Reads ``adapter_config.json`` and the weights file's header only. Raises :class:`AdapterError` (one
    line) for anything that cannot be merged exactly (see the module docstring and
    ``_REFUSED_LORA_FIELDS``) and for any damaged, hostile or unreadable file.

    VeRA stores only the largest in_features of its targets (vera_A is (r, max_in)); every VeRA module
    is read with in_features = max_in unless ``vera_in_features`` gives it ({module: n}). That is exact
    when all targeted modules share in_features (q/k/v/gate/up of a Llama).

    Example:
        >>> src = open_adapter("adapters/snli")                      # doctest: +SKIP
        >>> src.modules["model.layers.0.self_attn.q_proj"].scale     # doctest: +SKIP
        2.0
    """
    name = os.fspath(spec)
    try:
        path = hub.resolve(name)
    except OSError as exc:  # a directory on the way that cannot be searched
        raise AdapterError(f"adapter {name!r}: cannot be opened ({exc.strerror or exc})") from exc
    config, config_sha256 = _read_config(path, name)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "VERA"):
        raise AdapterError(f"adapter {name!r}: peft_type {show(peft_type)} is not supported; expected 'LORA' or 'VERA'")
    _check_config(config, name)
    rules = ConfigRules(config, PatternMatcher(f"adapter {name!r}: {CONFIG_NAME}:"))
    weights_file = _weights_file(path, name)
    header, weights_version = _read_header(weights_file, name)
    if peft_type == "LORA":
        modules = _lora_modules(header, config, name, rules)
    else:
        modules = _vera_modules(header, config, name, vera_in_features or {}, rules)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {weights_file.name} holds no {peft_type} module tensors")
    used = {k for s in modules.values() for k in (s.a_key, s.b_key)} | ({VERA_A_KEY, VERA_B_KEY} & set(header))
    dtypes = {header[k][0] for k in used}
    dtype = functools.reduce(torch.promote_types, sorted(dtypes, key=str))
    return AdapterSource(name=name, path=path, config=config, weights_file=weights_file, dtype=dtype,
                         modules=dict(sorted(modules.items())), peft_type=peft_type,
                         weights_version=weights_version, config_sha256=config_sha256)


def weights_sha256(src: AdapterSource) -> str:
    """Hex SHA-256 of the weights file as :func:`open_adapter` read it (``src.weights_version``), computed
    once per version in a process. :class:`AdapterChangedError` if the file is no longer that version:
    a merge report never names the hash of a file other than the one the merge read.

    Example:
        >>> weights_sha256(open_adapter("adapters/snli"))   # doctest: +SKIP
        '9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08'
    """
    return version_sha256(src.weights_file, src.weights_version, f"adapter {src.name!r}: {src.weights_file.name}")


def _exists(path: Path) -> bool:
    """Whether anything (a file, a directory, a dangling symlink) is at ``path``; True when that cannot be
    told (a directory that cannot be searched): opening it then says why, in one line."""
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True
    return True


def _read_config(path: Path, name: str) -> tuple[dict[str, Any], str]:
    """(adapter_config.json parsed, the sha256 of the bytes parsed)."""
    config_file = path / CONFIG_NAME
    where = f"adapter {name!r}: {CONFIG_NAME}"
    if not _exists(config_file):
        raise AdapterError(f"adapter {name!r}: no {CONFIG_NAME} in {path}; expected a PEFT adapter directory")
    data, _ = read_capped(config_file, where, CONFIG_MAX_BYTES)
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{where} is not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise AdapterError(f"{where} is not valid JSON here (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4300 digits
        raise AdapterError(f"{where} is not valid JSON ({show(str(exc), 200)})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where} must hold a JSON object, got a JSON {type(config).__name__}")
    if _depth(config) > CONFIG_MAX_DEPTH:
        raise AdapterError(f"{where} nests more than {CONFIG_MAX_DEPTH} levels deep; expected a PEFT config")
    return config, hashlib.sha256(data).hexdigest()


def _depth(value: Any) -> int:
    """How deeply ``value`` (parsed JSON) nests lists and objects (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _is_set(value: Any) -> bool:
    return value not in (None, False, "", 0) and not (isinstance(value, (dict, list)) and not value)


def _json_text(value: Any) -> str:
    """``value`` as JSON, cut short for a one-line message."""
    text = json.dumps(value)
    return text if len(text) <= 120 else f"{text[:119]}... ({len(text)} characters)"


def _check_config(config: Mapping[str, Any], name: str) -> None:
    """Refuse LoRA variants and settings that cannot be merged as x @ (scale * B @ A)^T, and fields whose
    type PEFT would not accept. (Patterns are compiled by :class:`ConfigRules`.)"""
    where = f"adapter {name!r}: {CONFIG_NAME}:"
    for key, value in config.items():
        if key not in _KNOWN_FIELDS and (value is True or (isinstance(value, (dict, list)) and value)):
            raise AdapterError(f"{where} unknown field {show(key)}={_json_text(value)} (a newer PEFT?); coremerge "
                               f"cannot tell whether it changes the adapter's forward, so it refuses to merge it")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where} bias={show(config['bias'])} trains base-model biases; expected bias 'none'")
    _check_targeting(config, where)
    if config["peft_type"] == "VERA":
        if not config.get("save_projection", True):
            raise AdapterError(f"{where} VeRA adapter saved without its projections (save_projection=false); "
                               f"re-save it with save_projection=True")
        _check_positive_int(config.get("r", 256), f"{where} r")
        return
    for field_name, why in _REFUSED_LORA_FIELDS.items():
        if _is_set(config.get(field_name)):
            raise AdapterError(f"{where} {field_name}={_json_text(config[field_name])}: {why}; cannot merge exactly")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_MUTATING_INITS):
        raise AdapterError(f"{where} init_lora_weights={show(init)}: the adapter is relative to a base model modified "
                           f"by that initialisation; re-save it with save_pretrained(..., "
                           f"path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter")
    _check_positive_int(config.get("r", 8), f"{where} r")
    _check_number(config.get("lora_alpha", 8), f"{where} lora_alpha")
    if isinstance(config.get("target_modules"), str) and (config.get("layers_to_transform") is not None
                                                          or config.get("layers_pattern") is not None):
        raise AdapterError(f"{where} layers_to_transform / layers_pattern cannot be used when target_modules is a "
                           f"regex string (PEFT's LoraConfig refuses it too)")
    for pattern_field, check in (("rank_pattern", _check_positive_int), ("alpha_pattern", _check_number)):
        patterns = config.get(pattern_field) or {}
        if not isinstance(patterns, dict):
            raise AdapterError(f"{where} {pattern_field} must be an object {{pattern: value}}, got {show(patterns)}")
        for key, value in patterns.items():
            check(value, f"{where} {pattern_field}[{show(key)}]")


def _check_targeting(config: Mapping[str, Any], where: str) -> None:
    """The fields PEFT's check_target_module_exists reads hold the types it handles."""
    for field_name, may_be_str in (("target_modules", True), ("exclude_modules", True), ("modules_to_save", False),
                                   ("layers_pattern", True)):
        value = config.get(field_name)
        if not (value is None or (may_be_str and isinstance(value, str))
                or (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            expected = "a string, a list of strings or null" if may_be_str else "a list of strings or null"
            raise AdapterError(f"{where} {field_name} is {show(value)}; expected {expected}")
    layers = config.get("layers_to_transform")
    if not (layers is None or _is_int(layers) or (isinstance(layers, list) and all(_is_int(v) for v in layers))):
        raise AdapterError(f"{where} layers_to_transform is {show(layers)}; expected a layer index, a list of them "
                           f"or null")
    if config.get("layers_pattern") and layers is None:
        raise AdapterError(f"{where} layers_pattern is set without layers_to_transform (PEFT refuses it too)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(value: Any, what: str) -> None:
    if not _is_int(value) or value < 1:
        raise AdapterError(f"{what} must be a positive integer, got {show(value)}")


def _check_number(value: Any, what: str) -> None:
    finite = isinstance(value, (int, float)) and not isinstance(value, bool)
    try:
        finite = finite and math.isfinite(float(value))
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        raise AdapterError(f"{what} must be a finite number, got {show(value)}")


def _weights_file(path: Path, name: str) -> Path:
    """adapter_model.safetensors if anything is there (a directory, FIFO or dangling link is then refused
    when it is opened, in one line), else the legacy adapter_model.bin."""
    for file_name in (SAFETENSORS_NAME, BIN_NAME):
        if _exists(path / file_name):
            return path / file_name
    raise AdapterError(f"adapter {name!r}: no {SAFETENSORS_NAME} (or legacy {BIN_NAME}) in {path}")


def _read_header(path: Path, name: str) -> tuple[dict[str, tuple[torch.dtype | str, tuple[int, ...]]], FileVersion]:
    """({key: (dtype, shape)} of a weights file, the version read), reading no tensor data (safetensors:
    the checked header of :mod:`coremerge.safetensors_file`; a dtype it cannot read as float stays a name)."""
    if path.name == BIN_NAME:
        state, version = _load_bin(path, name)
        return {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}, version
    with open_safetensors(path, where=f"adapter {name!r}: {path.name}") as f:
        entries, version = f.header.entries, f.version
    return {key: (FLOAT_DTYPES.get(e.dtype, e.dtype), e.shape) for key, e in entries.items()}, version


_BINS: OrderedDict[tuple[str, FileVersion], dict[str, Tensor]] = OrderedDict()  # the last 4 .bin files loaded
_BINS_LOCK = threading.Lock()


def _load_bin(path: Path, name: str, expect: FileVersion | None = None) -> tuple[dict[str, Tensor], FileVersion]:
    """A legacy adapter_model.bin and its version, only ever through torch.load(weights_only=True): never
    unpickle code. Loaded through the descriptor that was checked (a regular file, at ``expect``)."""
    where = f"adapter {name!r}: {path.name}"
    fd, version = open_expected(path, where, expect)
    try:
        with _BINS_LOCK:
            state = _BINS.get((str(path), version))
        if state is None:
            state = _torch_load(f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else str(path), where)
            if FileVersion.of(fd) != version:
                raise AdapterChangedError(f"{where} changed while it was being read; nothing built from it is kept; "
                                          f"run again")
            with _BINS_LOCK:
                _BINS[(str(path), version)] = state
                while len(_BINS) > 4:
                    _BINS.popitem(last=False)
    finally:
        os.close(fd)
    return state, version


def _torch_load(path: str, where: str) -> dict[str, Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # pre-zipfile format: no mmap
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: all mean "not a weights file"
        raise AdapterError(f"{where} cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                           f"{show(str(exc), 200)})") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(t, Tensor) for k, t in state.items()):
        raise AdapterError(f"{where} must hold a dict of named tensors")
    return state


def _unexpected(key: str, config: Mapping[str, Any], name: str, expected: str) -> None:
    modules_to_save = config.get("modules_to_save") or []
    rest = key.removeprefix(PREFIX)
    if any(re.search(rf"(^|\.){re.escape(m)}\.", rest) for m in modules_to_save):
        raise AdapterError(f"adapter {name!r}: tensor {show(key)} is a full weight saved by modules_to_save="
                           f"{show(list(modules_to_save))}; merging trained copies of whole modules is not supported")
    raise AdapterError(f"adapter {name!r}: unexpected tensor {show(key)}; expected only {expected}")


def _check_float(dtype: Any, where: str) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise AdapterError(f"{where} has dtype {dtype}; expected float64, float32, float16 or bfloat16")


def _check_targeted(rules: ConfigRules, module: str, name: str) -> None:
    why = rules.not_targeted(module)
    if why is not None:
        raise AdapterError(f"adapter {name!r}: module {show(module)} has adapter weights, but {why} in {CONFIG_NAME}; "
                           f"PEFT would not adapt this module and would drop its weights when loading the adapter")


def _lora_modules(header: Mapping[str, tuple[Any, tuple[int, ...]]], config: Mapping[str, Any], name: str,
                  rules: ConfigRules) -> dict[str, ModuleSpec]:
    keys: dict[str, dict[str, str]] = {}
    ambiguous: list[str] = []
    specific = (".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector", ".lora_B.bias")
    for key in sorted(header, key=lambda k: not k.endswith(specific)):  # the most telling refusal first
        rest = key.removeprefix(PREFIX)
        if rest == key:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {show(key)}; expected keys starting with "
                               f"{PREFIX!r}")
        if rest.endswith((".lora_A.weight", ".lora_B.weight")):
            module, slot = rest[: -len(".lora_A.weight")], rest[-len("A.weight")]
            keys.setdefault(module, {})[slot] = key
        elif rest.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise AdapterError(f"adapter {name!r}: module {show(rest.rsplit('.', 1)[0])} is an embedding LoRA; only "
                               f"LoRA on linear layers is supported (retrain without it in target_modules)")
        elif rest.endswith(".lora_velora_embed") and _is_set(config.get("velora_config")):
            continue  # VeLoRA's training-time activation compression state
        elif rest.endswith(".lora_magnitude_vector"):
            raise AdapterError(f"adapter {name!r}: tensor {show(key)} is a DoRA magnitude; DoRA cannot be merged "
                               f"exactly")
        elif rest.endswith(".lora_B.bias"):
            raise AdapterError(f"adapter {name!r}: tensor {show(key)} is a lora_B bias (lora_bias); cannot merge "
                               f"exactly")
        else:
            _unexpected(key, config, name, "*.lora_A.weight and *.lora_B.weight")
    modules = {}
    for module, pair in sorted(keys.items()):
        where = f"adapter {name!r}: module {show(module)}:"
        if set(pair) != {"A", "B"}:
            raise AdapterError(f"{where} has no {'lora_B' if 'A' in pair else 'lora_A'}.weight tensor")
        _check_targeted(rules, module, name)
        (a_dtype, a_shape), (b_dtype, b_shape) = header[pair["A"]], header[pair["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise AdapterError(f"{where} lora_A {list(a_shape)} / lora_B {list(b_shape)} are not matrices (a conv "
                               f"LoRA?); only LoRA on linear layers is supported")
        _check_float(a_dtype, f"{where} lora_A")
        _check_float(b_dtype, f"{where} lora_B")
        (r, n), (m, r_b) = a_shape, b_shape  # lora_A (r, in), lora_B (out, r)
        if min(r, n, m, r_b) < 1:
            raise AdapterError(f"{where} lora_A is {r}x{n} and lora_B is {m}x{r_b}: a module of zero size; expected "
                               f"r, in_features and out_features >= 1")
        if r_b != r:
            raise AdapterError(f"{where} lora_A is {r}x{n} and lora_B is {m}x{r_b}; expected lora_B (out, r) and "
                               f"lora_A (r, in) with the same r")
        expected_r, _ = rules.rank_alpha(module)
        if r != expected_r:
            raise AdapterError(f"{where} stored rank {r} but the config (r / rank_pattern) gives {show(expected_r)}"
                               f"{rules.order_hint(rules.ranks, rules.rank_pattern, module)}")
        if rules.order_hint(rules.alphas, rules.alpha_pattern, module):
            ambiguous.append(module)
        modules[module] = ModuleSpec(name=module, a_key=pair["A"], b_key=pair["B"], rank=r, out_features=m,
                                     in_features=n, scale=rules.scale(module), kind="lora")
    if ambiguous:
        log.warning("adapter %r: %d modules (e.g. %s) match several alpha_pattern keys with different alphas; "
                    "using the first in adapter_config.json, as PEFT does when it loads the adapter (PEFT saves the "
                    "keys sorted, so the order used in training may have differed)", name, len(ambiguous),
                    show(ambiguous[0]))
    return modules


def _vera_modules(header: Mapping[str, tuple[Any, tuple[int, ...]]], config: Mapping[str, Any], name: str,
                  in_overrides: Mapping[str, int], rules: ConfigRules) -> dict[str, ModuleSpec]:
    if VERA_A_KEY not in header or VERA_B_KEY not in header:
        raise AdapterError(f"adapter {name!r}: VeRA projections {VERA_A_KEY} / {VERA_B_KEY} are missing from the "
                           f"weights; re-save with save_projection=True")
    (va_dtype, va), (vb_dtype, vb) = header[VERA_A_KEY], header[VERA_B_KEY]
    _check_float(va_dtype, f"adapter {name!r}: {VERA_A_KEY}")
    _check_float(vb_dtype, f"adapter {name!r}: {VERA_B_KEY}")
    r = config.get("r", 256)
    if len(va) != 2 or len(vb) != 2 or va[0] != r or vb[1] != r or va[1] < 1 or vb[0] < 1:
        raise AdapterError(f"adapter {name!r}: VeRA projections vera_A {list(va)} / vera_B {list(vb)}; expected "
                           f"({r}, max_in) and (max_out, {r}) for r={r}, max_in and max_out >= 1")
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
        where = f"adapter {name!r}: module {show(module)}:"
        if set(pair) != {"b", "d"}:
            raise AdapterError(f"{where} has no vera_lambda_{'d' if 'b' in pair else 'b'} tensor")
        _check_targeted(rules, module, name)
        (b_dtype, b_shape), (d_dtype, d_shape) = header[pair["b"]], header[pair["d"]]
        _check_float(b_dtype, f"{where} vera_lambda_b")
        _check_float(d_dtype, f"{where} vera_lambda_d")
        if len(b_shape) != 1 or len(d_shape) != 1 or d_shape[0] != r or not 1 <= b_shape[0] <= vb[0]:
            raise AdapterError(f"{where} vera_lambda_b {list(b_shape)} / vera_lambda_d {list(d_shape)}; expected "
                               f"(out,) with 1 <= out <= {vb[0]} and ({r},)")
        n = in_overrides.get(module, va[1])
        if not 1 <= n <= va[1]:
            raise AdapterError(f"{where} in_features {n} does not fit vera_A's {va[1]} columns")
        modules[module] = ModuleSpec(name=module, a_key=pair["d"], b_key=pair["b"], rank=r, out_features=b_shape[0],
                                     in_features=n, scale=1.0, kind="vera")
    return modules


@contextmanager
def _tensor_reader(src: AdapterSource) -> Iterator[Callable[..., Tensor]]:
    """``get(key, rows=None, cols=None)``: a tensor (or its leading rows/columns) from the weights file, which
    must still be the version :func:`open_adapter` read (else :class:`AdapterChangedError`)."""
    if src.weights_file.name == BIN_NAME:
        state, _ = _load_bin(src.weights_file, src.name, expect=src.weights_version)

        def get_bin(key: str, rows: int | None = None, cols: int | None = None) -> Tensor:
            t = state[key]
            return t[:rows] if cols is None else t[:rows, :cols]

        yield get_bin
        return
    where = f"adapter {src.name!r}: {src.weights_file.name}"
    with open_safetensors(src.weights_file, where=where, expect=src.weights_version) as f:

        def get_st(key: str, rows: int | None = None, cols: int | None = None) -> Tensor:
            t = f.tensor(key)  # the header is the one open_adapter checked: same version, so it holds key
            return t if rows is None and cols is None else (t[:rows] if cols is None else t[:rows, :cols])

        yield get_st


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

    Reads just that module's tensors, from the version of the weights file :func:`open_adapter` checked:
    a file replaced or rewritten since (even with its size and mtime kept) is an
    :class:`AdapterChangedError`. NaN/Inf in a stored tensor (or after folding) is an AdapterError.

    Example:
        >>> f = load_factors(open_adapter("adapters/snli"), "model.layers.0.self_attn.q_proj")  # doctest: +SKIP
        >>> f.a.shape, f.b.shape                                                           # doctest: +SKIP
        (torch.Size([16, 4096]), torch.Size([4096, 16]))
    """
    spec = src.modules.get(module)
    if spec is None:
        raise AdapterError(f"adapter {src.name!r}: has no module {show(module)}")
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


def _tensor_layout(modules: Mapping[str, LowRank | StoredLowRank],
                   config: Mapping[str, Any]) -> dict[str, tuple[str, str, tuple[int, int]]]:
    """tensor name -> (module, part, shape) for every tensor of the merged adapter, checked against ``config``."""
    layout: dict[str, tuple[str, str, tuple[int, int]]] = {}
    rules = ConfigRules(config, PatternMatcher("merged adapter config:"))  # once: a 70B merge has ~600 modules
    for module, lr in modules.items():
        rank = max(lr.rank, 1)  # PEFT needs r >= 1: an all-zero update is written as one zero rank
        (r, _), scale = rules.rank_alpha(module), rules.scale(module)
        if r != rank or abs(scale - 1.0) > 1e-12:
            raise ValueError(f"module {module!r}: rank {rank} but the config gives rank {r} and scale {scale}; "
                             f"build the config with adapter_config_for")
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


def write_adapter(out_dir: str | os.PathLike, modules: Mapping[str, LowRank | StoredLowRank], *, config: dict,
                  report: dict | None, dtype: torch.dtype, force: bool = False,
                  owned: Callable[[Path], bool] | None = None, staging: Path | None = None) -> Path:
    """Write a PEFT LoRA adapter directory atomically; returns its path.

    Everything is written into a temporary directory next to ``out_dir``
    (``.NAME.tmp-<host>-<pid>-XXXX``, or ``staging`` from :func:`reserve_output`) and renamed into
    place, so ``out_dir`` is either absent/untouched or complete. An existing ``out_dir`` is refused
    unless ``force``; with ``force`` it is replaced only after the new one is complete, and only if
    :func:`check_output` allows it: a merged adapter this tool wrote (:func:`is_merged_adapter`) or an
    empty directory, or, when ``owned`` is given, a directory for which ``owned`` says True (the
    pipeline's rule: its manifest may know a damaged output as its own). Never a symlink or a file.
    The old directory is swapped out in one step where the system allows it (``renameat2``), so
    there is no moment without ``out_dir``. Same inputs, same bytes. ``modules`` may hold
    :class:`StoredLowRank` entries: they are loaded one at a time while the weights file is written,
    so the merged adapter never has to fit in memory all at once.

    Example:
        >>> write_adapter("merged/", merged, config=adapter_config_for(srcs, ranks), report=None,
        ...               dtype=torch.bfloat16)                                # doctest: +SKIP
    """
    given = Path(out_dir)
    out = Path(os.path.abspath(given))  # "." or "merged/..": the directory's own name and real parent
    try:
        check_output(given, force=force, owned=owned)
        if not modules:
            raise ValueError("no merged modules to write")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"cannot write an adapter in {dtype}; expected one of {list(_SAFETENSORS_DTYPES)}")
        layout = _tensor_layout(modules, config)
        tmp = staging if staging is not None else reserve_output(given, force=force, owned=owned)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        sha = _save_streamed(tmp / SAFETENSORS_NAME, modules, layout, dtype, {"format": "pt"})
        (tmp / CONFIG_NAME).write_bytes(_json_bytes(config))
        if report is not None:
            (tmp / REPORT_NAME).write_bytes(_json_bytes(report))
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remember_sha256(out / SAFETENSORS_NAME, sha)  # renaming the directory kept the file's inode and mtime
    log.info("wrote %d modules to %s", len(modules), out)
    return given


def publish_dir(staging: Path, out: Path) -> None:
    """Put the complete directory ``staging`` (from :func:`reserve_output`) at ``out``: its files
    fsynced, its mode 0755, an existing ``out`` swapped out in one step where the system allows it."""
    for f in staging.iterdir():
        _fsync(f)
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    _replace_dir(staging, out)


def is_merged_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a ``merge_report.json`` that this tool wrote: a JSON object
    with ``coremerge_version`` and ``inputs``, as :func:`coremerge.merge.build_report` makes it.

    Example:
        >>> is_merged_adapter("adapters/snli")  # an input adapter has no report   # doctest: +SKIP
        False
    """
    report_file = Path(path) / REPORT_NAME
    try:
        if Path(path).is_symlink() or report_file.stat().st_size > _MAX_REPORT_BYTES:
            return False
        report = json.loads(report_file.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(report, dict) and isinstance(report.get("coremerge_version"), str)
            and isinstance(report.get("inputs"), list))


_MAX_REPORT_BYTES = 256 << 20  # a report lists modules: megabytes for the largest models, never this


def check_output(out: str | os.PathLike, *, force: bool = False, owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse (ValueError, one line) an output directory that may not be written.

    ``out`` must not exist, or be a directory that ``force`` may replace: an empty one or a merged
    adapter (:func:`is_merged_adapter`); when ``owned`` is given, it decides instead (its rule must
    itself refuse directories the caller did not write). A symlink, a file, or a path under a file
    is refused even with ``force``. Writability is tested by :func:`reserve_output`.
    """
    shown, out = out, Path(os.path.abspath(out))
    if out.is_symlink():
        raise OutputPathError(f"output {shown} is a symlink; refusing to write through it (even with --force): "
                              f"give the directory it points to, or another path")
    if os.path.lexists(out):
        if not out.is_dir():
            raise OutputPathError(f"output {shown} exists and is not a directory; choose another output directory")
        replaceable = owned(out) if owned is not None else (is_empty_dir(out) or is_merged_adapter(out))
        if not replaceable:
            raise OutputPathError(f"output directory {shown} exists and is not an adapter directory coremerge wrote "
                                  f"(no valid {REPORT_NAME}); refusing to replace it even with --force: "
                                  f"choose another output directory")
        if not force:
            raise OutputPathError(f"output directory {shown} exists; pass --force to overwrite it")
        return
    above = existing_ancestor(out)
    if not above.is_dir():
        raise OutputPathError(f"output {shown}: {above} is a file, not a directory; choose another output directory")


def reserve_output(out: str | os.PathLike, *, force: bool = False,
                   owned: Callable[[Path], bool] | None = None) -> Path:
    """Check ``out`` (:func:`check_output`) and create the temporary directory the adapter is written
    into, next to it: this is the honest test that ``out`` can be written (root passes access checks;
    a read-only file system does not). Returns the temp directory, for :func:`write_adapter`'s
    ``staging``; remove it if the write never happens. ValueError (one line) if it cannot be made.

    Example:
        >>> staging = reserve_output("merged/", force=True)  # doctest: +SKIP
    """
    shown, out = out, Path(os.path.abspath(out))
    check_output(shown, force=force, owned=owned)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_leftover_prefix(out, "tmp"), dir=out.parent))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST,
                             errno.ENAMETOOLONG, errno.ELOOP):
            raise  # a full disk, an I/O error: the CLI says so with exit 1
        where = err.filename if err.filename and Path(err.filename) != out.parent / Path(err.filename).name else None
        where = where or out.parent  # the directory that refused, not the temp name we asked for in it
        raise OutputPathError(f"cannot write output {shown}: {where}: {err.strerror or err}; "
                              f"choose a directory you can write") from None


def clean_dead_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove what writers of ``out`` that died on this host left next to it; returns what it removed.

    A writer's temp directory ``.NAME.tmp-<host>-<pid>-XXXX`` (a half-written adapter, or the old one
    after an exchange) and backup ``.NAME.old-<host>-<pid>-XXXX`` (the old adapter, moved aside) name
    the writer: those of a process that is no longer alive on this host are removed, except that a
    backup is moved back to ``out`` when ``out`` is missing (the writer died between its two renames).
    Leftovers of live writers, other hosts and unknown names are left alone.

    Example:
        >>> clean_dead_leftovers("merged/")  # doctest: +SKIP
        [PosixPath('.merged.tmp-node1-4242-k2j3h4g5')]
    """
    out = Path(os.path.abspath(out))
    host = _host()
    dead: list[tuple[str, Path]] = []
    for kind in ("old", "tmp"):
        prefix = f".{out.name}.{kind}-{host}-"
        try:
            entries = sorted(out.parent.glob(glob.escape(prefix) + "*"))
        except OSError:
            return []
        for entry in entries:
            pid = entry.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and not entry.is_symlink():
                dead.append((kind, entry))
    removed = []
    for kind, entry in dead:
        if kind == "old" and not os.path.lexists(out) and entry.is_dir():
            try:
                os.rename(entry, out)
                log.warning("restored %s from %s, which a writer that died left", out, entry.name)
                continue
            except OSError:
                pass
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("removed %d leftover(s) of dead writers next to %s", len(removed), out)
    return removed


def is_empty_dir(path: Path) -> bool:
    try:
        return next(os.scandir(path), None) is None
    except OSError:
        return False


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _leftover_prefix(out: Path, kind: str) -> str:
    """``.NAME.<kind>-<host>-<pid>-``: a temp ("tmp") or backup ("old") directory's name up to mkdtemp's suffix."""
    return f".{out.name}.{kind}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or file system does not offer it."""
    import ctypes

    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))


def _replace_dir(new: Path, out: Path) -> None:
    """Put the directory ``new`` at ``out``. An existing ``out`` is exchanged with ``new`` in one step
    (``renameat2(RENAME_EXCHANGE)``) where possible, else moved aside to ``.NAME.old-...`` first; the
    old directory is deleted only once the new one is in place."""
    if not os.path.lexists(out):
        if not _rename2(new, out, _RENAME_NOREPLACE):
            os.rename(new, out)
        return
    if _rename2(new, out, _RENAME_EXCHANGE):
        old = new  # the exchange left the old directory under the temp name
    else:
        old = Path(tempfile.mkdtemp(prefix=_leftover_prefix(out, "old"), dir=out.parent))
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
