"""How PEFT applies an adapter's config to a module, with untrusted regexes matched in bounded time.

PEFT (0.21) reads several regexes from ``adapter_config.json``: ``rank_pattern`` and
``alpha_pattern`` keys (a module's r and lora_alpha), ``target_modules`` and ``exclude_modules``
as strings, ``modules_to_save``, ``layers_pattern``. :class:`ConfigRules` reproduces what PEFT
does with them (``get_pattern_key``, ``check_target_module_exists``); :class:`PatternMatcher`
matches them as PEFT's ``re`` would, but each match under a timeout and all of an adapter's
matches under one budget, so that a hostile adapter cannot stall a job (see its docstring for why
the ``regex`` package and not a linear-time engine). :mod:`coremerge.peft_io` uses these to read
adapters and to write merged ones; nothing here reads a file.

Example:
    >>> rules = ConfigRules({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}, PatternMatcher("a:"))
    >>> rules.rank_alpha("model.layers.0.self_attn.q_proj"), rules.scale("model.layers.0.self_attn.v_proj")
    ((4, 16), 2.0)
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import regex

from coremerge.errors import AdapterError
from coremerge.safetensors_file import show

MATCH_TIMEOUT_S = 0.25  # one config regex against one module name (a normal match takes microseconds)
MATCH_BUDGET_S = 5.0  # all the regex matching of one adapter together
PATTERN_MAX_CHARS = 10_000  # one config regex


class PatternMatcher:
    r"""PEFT's regex matches (``re`` in peft 0.21) for one adapter, in bounded time; each failure is one line.

    The regexes of a config come from whoever wrote the adapter, and Python's ``re`` can take forever on
    some (``([\w.]+)+X`` against a module name: catastrophic backtracking; PEFT itself hangs on it). So:

    - a pattern is compiled with ``re`` first, so what PEFT cannot compile is refused, then with the
      ``regex`` package, which matches it: regex reads re's syntax the same way (its default VERSION0),
      except fuzzy matching (``{e<=1}``) and POSIX classes (``[[:digit:]]``), which re reads as literal
      characters: patterns using them are refused rather than matched differently;
    - regex is a backtracking engine too (its guards make ``([\w.]+)+X`` fast, not ``(.|.)+\d``), but
      its match functions take a ``timeout``: each match gets at most ``timeout_s`` and all matches of
      the adapter together ``budget_s``, so 10k modules against slow patterns cannot stall a job either.
      A linear-time engine (RE2) needs no timeout but lacks backreferences and lookarounds, which PEFT
      patterns may use: it could not match every pattern as PEFT does.

    Example:
        >>> m = PatternMatcher("adapter 'a': adapter_config.json:")
        >>> bool(m.match("target_modules", "q_proj|v_proj", "q_proj|v_proj", "v_proj", full=True))
        True
        >>> m.match("rank_pattern", "(.|.)+\\d", r"(.*\.)?((.|.)+\d)$", "model.layers.10.self_attn.q_proj")
        Traceback (most recent call last):
        coremerge.errors.AdapterError: adapter 'a': adapter_config.json: rank_pattern pattern '(.|.)+\\d' takes over 0.25 s to match module 'model.layers.10.self_attn.q_proj' (catastrophic backtracking: PEFT itself would hang on it); refusing the adapter
    """

    def __init__(self, where: str, *, timeout_s: float | None = None, budget_s: float | None = None) -> None:
        self.where = where
        self.timeout_s = MATCH_TIMEOUT_S if timeout_s is None else timeout_s
        self.budget_s = self.left_s = MATCH_BUDGET_S if budget_s is None else budget_s
        self._compiled: dict[str, Any] = {}  # regex source -> regex.Pattern

    def compile(self, field: str, pattern: Any, source: str) -> Any:
        """The regex ``source`` built around the config's ``pattern`` (of ``field``), compiled once."""
        compiled = self._compiled.get(source)
        if compiled is not None:
            return compiled
        what = f"{self.where} {field} pattern {show(pattern)}"
        if not isinstance(pattern, str):
            raise AdapterError(f"{what} is not a string")
        if len(pattern) > PATTERN_MAX_CHARS:
            raise AdapterError(f"{what} is {len(pattern)} characters long; expected at most {PATTERN_MAX_CHARS}")
        if _REGEX_ONLY_SYNTAX.search(_ESCAPE.sub("", pattern)):
            raise AdapterError(f"{what} uses fuzzy-match braces or a POSIX [:class:], which Python's re (what PEFT "
                               f"uses) reads as literal characters; write it without them")
        try:
            with warnings.catch_warnings():  # re's FutureWarning about "[[": not the user's business here
                warnings.simplefilter("ignore")
                re.compile(source)  # what PEFT compiles: a pattern re refuses cannot be loaded by PEFT either
            compiled = regex.compile(source)
        except Exception as exc:  # re.error, regex.error, RecursionError, OverflowError, ...: any is "invalid"
            raise AdapterError(f"{what} is not a valid regex ({type(exc).__name__}: {show(str(exc), 160)})") from None
        self._compiled[source] = compiled
        return compiled

    def match(self, field: str, pattern: Any, source: str, text: str, *, full: bool = False) -> Any:
        """``re.match(source, text)`` (``re.fullmatch`` when ``full``), bounded: AdapterError past the time allowed."""
        compiled = self.compile(field, pattern, source)
        timeout = min(self.timeout_s, self.left_s)
        start = time.perf_counter()
        try:
            if timeout <= 0:
                raise TimeoutError
            return (compiled.fullmatch if full else compiled.match)(text, timeout=timeout)
        except TimeoutError:
            if timeout < self.timeout_s:
                self.left_s = 0.0  # the budget ran out (regex may stop a little early: it is spent all the same)
            spent = (f"takes over {self.timeout_s:g} s to match module {show(text)}" if timeout >= self.timeout_s else
                     f"used up the {self.budget_s:g} s that matching all the adapter's patterns may take")
            raise AdapterError(f"{self.where} {field} pattern {show(pattern)} {spent} (catastrophic backtracking: PEFT "
                               f"itself would hang on it); refusing the adapter") from None
        finally:
            self.left_s = max(0.0, self.left_s - (time.perf_counter() - start)) if self.left_s > 0 else 0.0


_ESCAPE = re.compile(r"\\.", re.DOTALL)
_REGEX_ONLY_SYNTAX = re.compile(r"\{[^{}]*[a-z][^{}]*\}|\[:\^?[A-Za-z]+:\]")  # fuzzy {e<=1}, POSIX [:alpha:]
# A pattern that is a plain string (optionally after ^): letters, digits and other characters with no
# meaning in a regex, or a backslash and ASCII punctuation (what re.escape writes). Such a pattern p
# matches (.*\.)?(p)$ exactly when p is a dotted suffix of the module name (with ^: is the name), for
# names without a newline: looked up in a dict instead of matched one by one (a merged adapter's
# rank_pattern holds one "^<module>" key per module of another rank: thousands on a large model).
_PLAIN = re.compile(r"(\^?)((?:[^\\.^$*+?{}\[\]|()]|\\[ -/:-@\[-^`{-~])*)")
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def _suffix_regex(key: str) -> str:
    """The regex PEFT's get_pattern_key matches a rank_pattern/alpha_pattern key with."""
    return rf"(.*\.)?({key})$"


def _dotted_suffixes(module: str) -> list[str]:
    """``module`` and each part after one of its dots: "a.b.c" -> ["a.b.c", "b.c", "c"]."""
    return [module] + [module[i + 1:] for i, c in enumerate(module) if c == "."]


class PatternIndex:
    """One rank_pattern / alpha_pattern (its keys in config order), for PEFT's first-match lookup.

    Example:
        >>> index = PatternIndex(["^model\\\\.x", "q_proj", "layers\\\\.1\\\\..*"], "rank_pattern", PatternMatcher("a:"))
        >>> index.first("model.layers.1.q_proj"), index.first("model.x"), index.first("other")
        ('q_proj', '^model\\\\.x', None)
    """

    def __init__(self, keys: Iterable[str], field: str, matcher: PatternMatcher) -> None:
        self.keys, self.field, self.matcher = list(keys), field, matcher
        self._exact: dict[str, list[int]] = {}  # "^plain" keys: the plain string -> their positions
        self._suffix: dict[str, list[int]] = {}  # plain keys: the plain string -> their positions
        self._regexes: list[int] = []  # positions of the other keys, ascending
        for i, key in enumerate(self.keys):
            plain = _PLAIN.fullmatch(key) if isinstance(key, str) else None
            if plain is None:
                matcher.compile(field, key, _suffix_regex(key))  # refuses what PEFT could not compile
                self._regexes.append(i)
            else:
                table = self._exact if plain[1] else self._suffix
                table.setdefault(_UNESCAPE.sub(r"\1", plain[2]), []).append(i)

    def matching(self, module: str, *, first: bool = False) -> list[str]:
        """The keys that match ``module``, in config order (only the first one when ``first``)."""
        if "\n" in module:  # "$" also matches before a final newline: leave such names to the regex engine
            found, regexes = [], range(len(self.keys))
        else:
            found = self._exact.get(module, []) + [i for s in _dotted_suffixes(module) for i in self._suffix.get(s, ())]
            regexes = self._regexes
        stop = min(found, default=len(self.keys)) if first else len(self.keys)
        for i in regexes:
            if i > stop:
                break
            key = self.keys[i]
            if self.matcher.match(self.field, key, _suffix_regex(key), module):
                found.append(i)
                if first:
                    break
        found.sort()
        return [self.keys[i] for i in found[:1 if first else None]]

    def first(self, module: str) -> str | None:
        """The key PEFT's get_pattern_key picks for ``module``, or None."""
        keys = self.matching(module, first=True)
        return keys[0] if keys else None


def pattern_key(patterns: Sequence[str], module: str) -> str:
    """PEFT's ``get_pattern_key`` (peft.utils.other), reproduced exactly, in bounded time.

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
    key = PatternIndex(patterns, "pattern", PatternMatcher("adapter config:")).first(module)
    return module if key is None else key


class ConfigRules:
    """How PEFT (0.21) applies one adapter's config to a module: its r and alpha (rank_pattern /
    alpha_pattern), and whether it adapts the module at all (``check_target_module_exists``).

    Built once per adapter (patterns compiled and indexed once), matched in bounded time.

    Example:
        >>> rules = ConfigRules({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 2}},
        ...                     PatternMatcher("a:"))
        >>> rules.rank_alpha("model.layers.0.self_attn.q_proj"), rules.not_targeted("model.layers.0.self_attn.q_proj")
        ((2, 8), None)
        >>> rules.not_targeted("model.layers.0.mlp.up_proj")
        "target_modules ['q_proj'] names neither it nor a dotted suffix of it"
    """

    def __init__(self, config: Mapping[str, Any], matcher: PatternMatcher) -> None:
        self.config, self.matcher = config, matcher
        self.rank_pattern: Mapping[str, Any] = config.get("rank_pattern") or {}
        self.alpha_pattern: Mapping[str, Any] = config.get("alpha_pattern") or {}
        self.ranks = PatternIndex(self.rank_pattern, "rank_pattern", matcher)
        self.alphas = PatternIndex(self.alpha_pattern, "alpha_pattern", matcher)
        self.targets = config.get("target_modules")
        self.exclude = config.get("exclude_modules")
        self._target_set = set(self.targets) if isinstance(self.targets, list) else set()
        self._exclude_set = set(self.exclude) if isinstance(self.exclude, list) else set()

    def rank_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of ``module`` as PEFT's LoraModel resolves them (defaults r=8, alpha=8 as in LoraConfig)."""
        rank_key, alpha_key = self.ranks.first(module), self.alphas.first(module)
        r = self.config.get("r", 8) if rank_key is None else self.rank_pattern[rank_key]
        alpha = self.config.get("lora_alpha", 8) if alpha_key is None else self.alpha_pattern[alpha_key]
        return r, alpha

    def scale(self, module: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with use_rslora."""
        r, alpha = self.rank_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def not_targeted(self, module: str) -> str | None:
        """None when PEFT adapts ``module`` under this config, else why not (peft.tuners.tuners_utils
        ``check_target_module_exists``, step by step). A config without target_modules (PEFT would
        take the model type's defaults, unknown here) adapts everything; so does ``"all-linear"``."""
        config, match, suffixes = self.config, self.matcher.match, _dotted_suffixes(module)
        if self.exclude:
            if isinstance(self.exclude, str):
                if match("exclude_modules", self.exclude, self.exclude, module, full=True):
                    return f"exclude_modules {show(self.exclude)} (a regex matched against the whole name) matches it"
            elif any(s in self._exclude_set for s in suffixes):
                return f"exclude_modules {show(self.exclude)} names it"
        for saved in config.get("modules_to_save") or ():
            if match("modules_to_save", saved, rf"(^|.*\.){saved}($|\..*)", module):
                return f"it is in modules_to_save ({show(saved)}), which PEFT never adapts"
        targets = self.targets
        if targets is None:
            return None
        if isinstance(targets, str):
            if targets.lower() == "all-linear" or match("target_modules", targets, targets, module, full=True):
                return None
            return f"target_modules {show(targets)} (a regex matched against the whole name) does not match it"
        if module in self._target_set:
            return None
        if not any(s in self._target_set for s in suffixes[1:]):
            return f"target_modules {show(targets)} names neither it nor a dotted suffix of it"
        layers, layers_pattern = config.get("layers_to_transform"), config.get("layers_pattern")
        if layers is None or layers == []:
            return None
        found = None
        if not layers_pattern:
            default = r".*?\.[^.]*\.(?P<idx>\d+)\."  # PEFT's: the first number after a dotted name
            found = match("layers_to_transform", default, default, module)
        else:
            for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
                found = match("layers_pattern", pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module)
                if found is not None:
                    break
        index = found.groupdict().get("idx") if found is not None else None
        try:
            index = None if index is None else int(index)
        except ValueError:  # a "layer index" of over 4300 digits
            index = None
        if index is None:
            return (f"layers_to_transform is {show(layers)} but its name has no layer index (layers_pattern "
                    f"{show(layers_pattern)})")
        if index == layers if isinstance(layers, int) else index in layers:
            return None
        return f"its layer {index} is not in layers_to_transform {show(layers)}"

    def order_hint(self, index: PatternIndex, patterns: Mapping[str, Any], module: str) -> str:
        """A note when several keys of ``patterns`` with different values match ``module`` (their order decides)."""
        matching = index.matching(module)
        if len({json.dumps(patterns[k]) for k in matching}) < 2:
            return ""
        return (f" (keys {show(matching)} all match it and the first in adapter_config.json wins; PEFT saves them "
                f"sorted, so the order used in training is lost and PEFT itself cannot load this adapter)")


def resolve_rank_alpha(config: Mapping[str, Any], module: str) -> tuple[int, float]:
    """(r, lora_alpha) of ``module`` as PEFT's LoraModel resolves them (defaults r=8, alpha=8 as in LoraConfig)."""
    return ConfigRules(config, PatternMatcher("adapter config:")).rank_alpha(module)


def lora_scale(config: Mapping[str, Any], module: str) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with use_rslora, for ``module`` (patterns resolved)."""
    return ConfigRules(config, PatternMatcher("adapter config:")).scale(module)
