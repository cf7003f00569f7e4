"""coremerge.peft_io against PEFT itself: real adapters of tiny random models, saved by PEFT, read by
us and loaded back by PEFT. The core check: load_factors(...).delta() equals PEFT's own
get_delta_weight for every module (scale, rslora, rank/alpha patterns, fan_in_fan_out, VeRA)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import safetensors.torch  # noqa: E402
from peft_factories import (block_network, load_peft_model, make_tiny_gpt2, make_tiny_llama,  # noqa: E402
                            peft_layers, save_adapter, save_lora_adapter)

from coremerge.errors import AdapterChangedError, AdapterError  # noqa: E402
from coremerge.peft_io import (adapter_config_for, check_compatible, file_sha256, load_factors,  # noqa: E402
                               open_adapter, pattern_key, union_modules, write_adapter)
from coremerge.types import LowRank, StoredLowRank  # noqa: E402
from coremerge import safetensors_file  # noqa: E402
from coremerge.peft_io import ConfigRules, PatternMatcher, weights_sha256  # noqa: E402
from coremerge.safetensors_file import FileVersion  # noqa: E402

LoraConfig, VeraConfig = peft.LoraConfig, peft.VeraConfig
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module", autouse=True)
def _no_network():
    with pytest.MonkeyPatch.context() as mp:
        block_network(mp)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def plain(root) -> Path:
    """alpha != r: scale 12/4 = 3 on attention and down_proj."""
    return save_lora_adapter(root, "plain", LoraConfig(r=4, lora_alpha=12, target_modules=ATTN + ["down_proj"]),
                             seed=1)


def check_against_peft(path: Path, base=make_tiny_llama, *, rtol=1e-5, atol=1e-6, **open_kwargs):
    """Every module: our rank/scale == PEFT's layer.r / layer.scaling, our delta == PEFT's delta."""
    src = open_adapter(path, **open_kwargs)
    layers = peft_layers(load_peft_model(path, base=base))
    assert list(src.modules) == sorted(layers)
    for name, layer in layers.items():
        spec = src.modules[name]
        if spec.kind == "lora":
            assert spec.rank == layer.r["default"]
            assert spec.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        expected = layer.get_delta_weight("default").float()
        if layer.fan_in_fan_out:
            expected = expected.T  # PEFT's delta is in the Conv1D (in, out) layout
        factors = load_factors(src, name)
        assert factors.a.dtype == factors.b.dtype == torch.float32
        torch.testing.assert_close(factors.delta(), expected, rtol=rtol, atol=atol)
    return src


def one_line_naming(exc: pytest.ExceptionInfo, *names: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message, (name, message)
    return message


# ------------------------------------------------------------------------------------- reading = PEFT
def test_alpha_not_r_matches_peft(plain):
    src = check_against_peft(plain)
    assert src.peft_type == "LORA" and src.dtype == torch.float32 and src.weights_file.name.endswith(".safetensors")
    assert {spec.scale for spec in src.modules.values()} == {3.0}
    assert len(src.modules) == 2 * 5 and list(src.modules) == sorted(src.modules)
    spec = src.modules[Q0]
    assert (spec.rank, spec.out_features, spec.in_features, spec.kind) == (4, 32, 32, "lora")
    assert src.modules["model.layers.0.self_attn.k_proj"].out_features == 16  # 2 kv heads x 8


def test_source_pickles(plain):
    src = open_adapter(plain)
    assert pickle.loads(pickle.dumps(src)) == src


def test_load_factors_folds_scale_once(plain):
    src = open_adapter(plain)
    raw = safetensors.torch.load_file(plain / "adapter_model.safetensors")
    f1, f2 = load_factors(src, Q0), load_factors(src, Q0)
    torch.testing.assert_close(f1.b, 3.0 * raw[f"base_model.model.{Q0}.lora_B.weight"])
    torch.testing.assert_close(f1.a, raw[f"base_model.model.{Q0}.lora_A.weight"])
    assert torch.equal(f1.b, f2.b)  # reading twice does not fold twice
    assert load_factors(src, Q0, dtype=torch.float64).b.dtype == torch.float64


def test_rslora_matches_peft(root):
    path = save_lora_adapter(root, "rslora", LoraConfig(r=9, lora_alpha=6, use_rslora=True, target_modules=ATTN),
                             seed=2)
    src = check_against_peft(path)
    assert {spec.scale for spec in src.modules.values()} == {2.0}  # 6 / sqrt(9)


@pytest.fixture(scope="module")
def patterned(root) -> Path:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=ATTN,
        rank_pattern={Q0: 6, "q_proj": 2, r"layers\.1\.self_attn\.(k|v)_proj": 3},
        alpha_pattern={r"model\.layers\.1\..*": 7, "v_proj": 5},
    )
    return save_lora_adapter(root, "patterns", config, seed=3)


def test_rank_and_alpha_patterns_match_peft(patterned):
    src = check_against_peft(patterned)
    # independently written out: the first key in adapter_config.json that matches a dotted suffix wins
    expected = {  # module: (rank, alpha)
        "model.layers.0.self_attn.q_proj": (6, 8), "model.layers.0.self_attn.k_proj": (4, 8),
        "model.layers.0.self_attn.v_proj": (4, 5), "model.layers.0.self_attn.o_proj": (4, 8),
        "model.layers.1.self_attn.q_proj": (2, 7), "model.layers.1.self_attn.k_proj": (3, 7),
        "model.layers.1.self_attn.v_proj": (3, 7), "model.layers.1.self_attn.o_proj": (4, 7),
    }
    assert {m: (s.rank, s.scale) for m, s in src.modules.items()} == {m: (r, a / r) for m, (r, a) in expected.items()}


def test_pattern_precedence_is_the_order_in_the_file(patterned, tmp_path, caplog):
    path = clone(patterned, tmp_path / "reordered")
    config = json.loads((path / "adapter_config.json").read_text())
    assert list(config["alpha_pattern"]) == [r"model\.layers\.1\..*", "v_proj"]  # PEFT saved them sorted
    config["alpha_pattern"] = {"v_proj": 5, r"model\.layers\.1\..*": 7}  # now v_proj comes first
    (path / "adapter_config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="coremerge.peft_io"):
        src = check_against_peft(path)  # PEFT's from_pretrained agrees
    assert src.modules["model.layers.1.self_attn.v_proj"].scale == 5 / 3
    assert src.modules["model.layers.1.self_attn.k_proj"].scale == 7 / 3
    assert "match several alpha_pattern keys" in caplog.text


def test_pattern_order_lost_by_peft_save_is_refused(root):
    # given order: the specific key after "q_proj", so layer 0's q_proj trained with rank 2; PEFT saves the keys
    # sorted, Q0 first, and then reads rank 6: PEFT itself cannot load its own adapter
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2, Q0: 6})
    path = save_lora_adapter(root, "patterns_reversed", config, seed=4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_peft_model(path)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), Q0, "stored rank 2", "gives 6", "sorted")


def test_pattern_key_is_peft_get_pattern_key():
    from peft.utils.other import get_pattern_key

    patterns = [[Q0, "q_proj"], ["q_proj", Q0], ["proj"], [r"layers\.\d\.self_attn\.q_proj", "q_proj"],
                ["self_attn.q_proj|k_proj"], ["^model.layers.0.self_attn.q_proj"], [r"^model\.layers\.1\..*"], []]
    keys = [Q0, "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.10.mlp.up_proj"]
    for p in patterns:
        for key in keys:
            assert pattern_key(p, key) == get_pattern_key(p, key), (p, key)


def test_different_target_sets_union(root, plain):
    other = save_lora_adapter(root, "mlp", LoraConfig(r=3, target_modules=["v_proj", "up_proj"]), seed=5)
    sources = [open_adapter(plain), open_adapter(other)]
    check_compatible(sources)
    expected = sorted(set(sources[0].modules) | set(sources[1].modules))
    assert union_modules(sources) == expected and len(expected) == 2 * 6
    config = adapter_config_for(sources, {m: 7 for m in expected})
    assert config["target_modules"] == sorted(ATTN + ["down_proj", "up_proj"])


def test_fan_in_fan_out_gpt2_conv1d(root, tmp_path):
    path = save_adapter(root, "gpt2", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]),
                        seed=6, base=make_tiny_gpt2)
    src = check_against_peft(path, base=make_tiny_gpt2)  # compares with PEFT's delta transposed
    assert src.config["fan_in_fan_out"] is True
    c_attn = "transformer.h.0.attn.c_attn"
    assert (src.modules[c_attn].out_features, src.modules[c_attn].in_features) == (48, 16)  # nn.Linear orientation
    # written back, PEFT reads the same update into the Conv1D layer
    merged = {m: LowRank(a=(f := load_factors(src, m)).a, b=f.b) for m in src.modules}
    out = write_adapter(tmp_path / "out", merged, config=adapter_config_for([src], {m: 2 for m in merged}),
                        report=None, dtype=torch.float32)
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    layers = peft_layers(load_peft_model(out, base=make_tiny_gpt2))
    for m, lr in merged.items():
        torch.testing.assert_close(layers[m].get_delta_weight("default").T, lr.delta(), rtol=1e-5, atol=1e-6)


def test_vera_matches_peft(root):
    config = VeraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj"], save_projection=True)
    src = check_against_peft(save_adapter(root, "vera", config, seed=7))
    assert src.peft_type == "VERA" and {(s.kind, s.scale, s.rank) for s in src.modules.values()} == {("vera", 1.0, 4)}


def test_vera_in_features_override_for_mixed_targets(root, plain):
    path = save_adapter(root, "vera_mixed", VeraConfig(r=4, target_modules=["q_proj", "down_proj"]), seed=8)
    default = open_adapter(path)
    assert default.modules[Q0].in_features == 64  # vera_A holds only max(in_features): q_proj's 32 is unknowable
    with pytest.raises(AdapterError) as exc:
        check_compatible([open_adapter(plain), default])
    one_line_naming(exc, Q0, "32x32", "32x64", "vera_in_features")
    q_in = {f"model.layers.{i}.self_attn.q_proj": 32 for i in range(2)}
    check_against_peft(path, vera_in_features=q_in)


def test_legacy_bin_matches_peft_and_uses_weights_only(root, monkeypatch):
    path = save_lora_adapter(root, "legacy", LoraConfig(r=3, lora_alpha=5, target_modules=ATTN), seed=9,
                             safe_serialization=False)
    assert not (path / "adapter_model.safetensors").exists()
    calls = []
    real_load = torch.load
    with monkeypatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
        src = open_adapter(path)
        load_factors(src, Q0)
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert src.weights_file.name == "adapter_model.bin"
    check_against_peft(path)


def test_bf16_adapter_keeps_dtype(root):
    path = save_lora_adapter(root, "bf16", LoraConfig(r=4, lora_alpha=8, target_modules=ATTN), seed=10,
                             dtype=torch.bfloat16)
    src = open_adapter(path)
    assert src.dtype == torch.bfloat16
    layers = peft_layers(load_peft_model(path))
    for name, layer in layers.items():  # independent: PEFT's stored weights and scaling, in float32
        expected = layer.scaling["default"] * (layer.lora_B["default"].weight.float()
                                               @ layer.lora_A["default"].weight.float())
        torch.testing.assert_close(load_factors(src, name).delta(), expected, rtol=1e-6, atol=1e-6)
    assert load_factors(src, Q0, dtype=torch.bfloat16).a.dtype == torch.bfloat16


def test_velora_training_state_is_skipped(root):
    from peft.tuners.lora.config import VeloraConfig

    path = save_lora_adapter(root, "velora", LoraConfig(r=2, target_modules=["q_proj"], velora_config=VeloraConfig()),
                             seed=11)
    check_against_peft(path)


# ------------------------------------------------------------------------------------------ refusals
def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> Path:
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return path


def test_refuses_missing_path(tmp_path):
    with pytest.raises(AdapterError) as exc:
        open_adapter(tmp_path / "nope")
    one_line_naming(exc, str(tmp_path / "nope"))


@pytest.mark.parametrize("damage, expected", [
    (lambda p: (p / "adapter_config.json").unlink(), "adapter_config.json"),
    (lambda p: (p / "adapter_config.json").write_text("{not json"), "not valid JSON"),
    (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors"),
    (lambda p: edit_config(p, peft_type="LOHA"), "LOHA"),
    (lambda p: edit_config(p, init_lora_weights="pissa_niter_4"), "path_initial_model_for_weight_conversion"),
    (lambda p: edit_config(p, use_fancy_new_variant=True), "use_fancy_new_variant"),
    (lambda p: edit_config(p, use_qalora=True), "use_qalora"),
    (lambda p: edit_config(p, bias="all"), "bias"),
    (lambda p: edit_config(p, r=5), "module 'model.layers.0.mlp.down_proj': stored rank 4"),
    (lambda p: edit_config(p, rank_pattern={"q_proj": 2}), f"module '{Q0}'"),
], ids=["no_config", "bad_json", "no_weights", "peft_type", "pissa", "unknown_field", "qalora", "bias", "r",
        "rank_pattern"])
def test_refuses_bad_directory(plain, tmp_path, damage, expected):
    path = clone(plain, tmp_path / "bad")
    damage(path)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), expected)


def _truncate(p: Path, keep: int | None = None) -> None:
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: keep if keep is not None else len(data) - 10])


def _corrupt_header(p: Path) -> None:
    data = bytearray((p / "adapter_model.safetensors").read_bytes())
    data[9:21] = b"#" * 12
    (p / "adapter_model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, lambda p: _truncate(p, 30), lambda p: _truncate(p, 5),
                                    _corrupt_header], ids=["cut_data", "cut_header", "cut_length", "corrupt_header"])
def test_refuses_damaged_safetensors(plain, tmp_path, damage):
    path = clone(plain, tmp_path / "bad")
    damage(path)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), "adapter_model.safetensors")


def _rewrite(path: Path, change) -> None:
    tensors = safetensors.torch.load_file(path / "adapter_model.safetensors")
    change(tensors)
    safetensors.torch.save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_factors_refuses_non_finite(plain, tmp_path, bad):
    path = clone(plain, tmp_path / "nan")
    key = f"base_model.model.{Q0}.lora_B.weight"
    _rewrite(path, lambda t: t[key].__setitem__((0, 0), bad))
    src = open_adapter(path)  # the header is fine
    with pytest.raises(AdapterError) as exc:
        load_factors(src, Q0)
    one_line_naming(exc, str(path), Q0, key, "NaN or Inf")
    load_factors(src, "model.layers.1.self_attn.q_proj")  # the other modules still read


def test_refuses_module_without_lora_b(plain, tmp_path):
    path = clone(plain, tmp_path / "half")
    _rewrite(path, lambda t: t.pop(f"base_model.model.{Q0}.lora_B.weight"))
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), Q0, "lora_B")


def test_refuses_unknown_module(plain):
    with pytest.raises(AdapterError) as exc:
        load_factors(open_adapter(plain), "model.layers.0.mlp.up_proj")
    one_line_naming(exc, str(plain), "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("name, config, expected", [
    ("dora", lambda: LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "use_dora"),
    ("lora_bias", lambda: LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True), "lora_bias"),
    ("mts", lambda: LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ("embedding", lambda: LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]), "model.embed_tokens"),
    ("vera_noproj", lambda: VeraConfig(r=4, target_modules=["q_proj"], save_projection=False), "save_projection"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_refuses_real_peft_variants(root, name, config, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = config()
    path = save_adapter(root, f"refused_{name}", config, seed=12)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), expected)


def test_refuses_dora_weights_even_if_config_says_otherwise(root, tmp_path):
    path = clone(save_adapter(root, "dora_w", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), seed=13),
                 tmp_path / "dora")
    edit_config(path, use_dora=False)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), "lora_magnitude_vector", "DoRA")


def test_check_compatible_refuses_shape_mismatch(root, plain):
    wide = save_lora_adapter(root, "wide_mlp", LoraConfig(r=2, target_modules=["down_proj"]), seed=14,
                             base=lambda: make_tiny_llama(intermediate_size=48))
    with pytest.raises(AdapterError) as exc:
        check_compatible([open_adapter(plain), open_adapter(wide)])
    one_line_naming(exc, str(plain), str(wide), "model.layers.0.mlp.down_proj", "32x64", "32x48")


def test_check_compatible_refuses_fan_in_fan_out_mismatch(plain, tmp_path):
    flipped = edit_config(clone(plain, tmp_path / "flipped"), fan_in_fan_out=True)
    with pytest.raises(AdapterError) as exc:
        check_compatible([open_adapter(plain), open_adapter(flipped)])
    one_line_naming(exc, str(plain), str(flipped), "fan_in_fan_out")
    with pytest.raises(AdapterError):
        check_compatible([])


# ---------------------------------------------------------------------- untrusted input (issue 12)
# Points 2 (inputs changed during a run), 7 (tensors outside target_modules, zero-size modules),
# 9 (catastrophic regexes) and 14 (never a traceback) for adapters; the byte layer's own corpus and fuzz
# test are in tests/test_safetensors_file.py.
CATASTROPHIC = r"(.|.)+\d"  # exponential for Python's re AND for the regex package (its guards do not help)
CHANGED = (r"adapter '.*': adapter_model\.(safetensors|bin) changed since it was opened \(.+\); nothing built from it "
           r"is kept; run again")


def test_source_records_the_versions_it_read(plain):
    src = open_adapter(plain)
    weights = plain / "adapter_model.safetensors"
    assert src.weights_version == FileVersion.of_path(weights)
    assert src.config_sha256 == hashlib.sha256((plain / "adapter_config.json").read_bytes()).hexdigest()
    assert weights_sha256(src) == hashlib.sha256(weights.read_bytes()).hexdigest()


def _replace_file(path: Path) -> None:
    """A new version renamed over the old one (what most tools do): another inode."""
    tensors = safetensors.torch.load_file(path)
    safetensors.torch.save_file({k: 2 * t for k, t in tensors.items()}, path.with_suffix(".new"), metadata={"format": "pt"})
    os.replace(path.with_suffix(".new"), path)


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    """What ``cp -p`` / ``rsync -t`` leave: other bytes in the same inode, same size, mtime restored."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the last float32 becomes 1.0
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)


@pytest.mark.parametrize("change", [_replace_file, _rewrite_keeping_size_and_mtime], ids=["replaced", "size_mtime_kept"])
def test_weights_changed_after_open_are_refused_and_never_reported(plain, tmp_path, change):
    from coremerge.merge import MergeOptions, build_report

    path = clone(plain, tmp_path / "a")
    src = open_adapter(path)
    old_sha = weights_sha256(src)  # hashed (and cached) before the change: still not reported after it
    load_factors(src, Q0)
    change(path / "adapter_model.safetensors")
    for read in (lambda: load_factors(src, Q0), lambda: weights_sha256(src),
                 lambda: build_report([src], MergeOptions(), {}, out_dtype=torch.float32, timings={})):
        with pytest.raises(AdapterChangedError, match=CHANGED) as exc:
            read()
        one_line_naming(exc, str(path), "adapter_model.safetensors")
    again = open_adapter(path)  # opened anew: the new version, read and reported
    new_sha = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert weights_sha256(again) == new_sha != old_sha
    report = build_report([again], MergeOptions(), {}, out_dtype=torch.float32, timings={})
    assert report["inputs"][0]["sha256"] == new_sha


def test_legacy_bin_changed_after_open_is_refused(root, tmp_path):
    path = clone(save_lora_adapter(root, "legacy_changed", LoraConfig(r=2, target_modules=["q_proj"]), seed=20,
                                   safe_serialization=False), tmp_path / "bin")
    src = open_adapter(path)
    weights = path / "adapter_model.bin"
    assert src.weights_version == FileVersion.of_path(weights)
    weights.write_bytes(weights.read_bytes())  # the same bytes, rewritten: ctime moves
    with pytest.raises(AdapterChangedError, match=CHANGED):
        load_factors(src, Q0)
    with pytest.raises(AdapterChangedError, match="changed since it was opened"):
        weights_sha256(src)
    load_factors(open_adapter(path), Q0)


def test_weights_sha256_is_hashed_once_per_version(plain, tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_file, "RACY_NS", 0)
    hashed = []
    real = safetensors_file._hash_fd
    monkeypatch.setattr(safetensors_file, "_hash_fd", lambda fd: hashed.append(fd) or real(fd))
    src = open_adapter(clone(plain, tmp_path / "a"))
    assert weights_sha256(src) == weights_sha256(src) == weights_sha256(open_adapter(src.path))
    assert len(hashed) == 1


# point 9: regexes from the config
@pytest.mark.parametrize("changes, field", [
    ({"rank_pattern": {CATASTROPHIC: 4}}, "rank_pattern"),
    ({"alpha_pattern": {"v_proj": 3, CATASTROPHIC: 4}}, "alpha_pattern"),
    ({"target_modules": CATASTROPHIC}, "target_modules"),
    ({"exclude_modules": CATASTROPHIC}, "exclude_modules"),
    ({"layers_to_transform": [0, 1], "layers_pattern": [CATASTROPHIC]}, "layers_pattern"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_catastrophic_regex_is_refused_in_seconds(plain, tmp_path, changes, field):
    path = edit_config(clone(plain, tmp_path / "slow"), **changes)
    started = time.perf_counter()
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    assert time.perf_counter() - started < 10
    one_line_naming(exc, str(path), field, repr(CATASTROPHIC), "catastrophic backtracking")


def test_issues_pattern_no_longer_hangs(plain, tmp_path):
    # ([\w.]+)+X hangs Python's re (and PEFT) on a module name; the regex package's guards match it in
    # linear time: it matches nothing, as re would if it ever finished, so the adapter is read as it is.
    path = edit_config(clone(plain, tmp_path / "issue"), rank_pattern={r"([\w.]+)+X": 2})
    started = time.perf_counter()
    src = open_adapter(path)
    assert time.perf_counter() - started < 10
    assert {s.rank for s in src.modules.values()} == {4}


def test_inspect_refuses_a_catastrophic_regex_in_one_line(plain, tmp_path):
    path = edit_config(clone(plain, tmp_path / "slow"), rank_pattern={CATASTROPHIC: 4})
    proc = subprocess.run([sys.executable, "-m", "coremerge", "inspect", str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(path) in proc.stderr and "rank_pattern" in proc.stderr and repr(CATASTROPHIC) in proc.stderr


def test_regex_matching_has_a_budget_per_adapter():
    # Each match is bounded, and so is their sum: many modules against slow patterns cannot stall either.
    matcher = PatternMatcher("adapter 'a': adapter_config.json:", timeout_s=10, budget_s=0.3)
    started = time.perf_counter()
    for i in range(1000):  # fast matches spend little of the budget
        assert matcher.match("rank_pattern", "q_proj", r"(.*\.)?(q_proj)$", f"model.layers.{i}.self_attn.q_proj")
    with pytest.raises(AdapterError, match=r"used up the 0\.3 s that matching all the adapter's patterns may take"):
        matcher.match("rank_pattern", CATASTROPHIC, rf"(.*\.)?({CATASTROPHIC})$", "model.layers.0.self_attn.q_proj")
    with pytest.raises(AdapterError, match="used up"):  # and nothing more once it is spent
        matcher.match("rank_pattern", "q_proj", r"(.*\.)?(q_proj)$", "q_proj")
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("pattern, expected", [
    ("(", "is not a valid regex"),
    (r"\p{L}", "is not a valid regex"),  # regex-only syntax that PEFT's re refuses
    ("(?<name>q)_proj", "is not a valid regex"),
    ("q_proj{e<=1}", "fuzzy"),  # re reads these as literal characters, regex as fuzzy matching
    ("layers.[[:digit:]]", "POSIX"),
], ids=["unbalanced", "unicode_property", "named_group", "fuzzy", "posix"])
def test_invalid_or_ambiguous_regex_is_refused(plain, tmp_path, pattern, expected):
    path = edit_config(clone(plain, tmp_path / "bad"), rank_pattern={pattern: 4})
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), "rank_pattern", expected)


def test_pattern_key_matches_peft_for_plain_escaped_and_regex_keys():
    import random
    import re

    from peft.utils.other import get_pattern_key

    modules = [Q0, "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj", "q_proj", "model.q_proj\n",
               "model.layers.0.self_attn.q_proj.", "lm_head", "a.b.c", ".x", ""]
    pool = ["q_proj", "self_attn.q_proj", "^" + re.escape(Q0), re.escape(Q0), "^q_proj", r"layers\.1\..*", "proj",
            r"down_proj$", "^model", "lm_head", "x", "", "^", r"q_proj\n", r"model\.q_proj", r"\d+\.mlp\.down_proj",
            "c", "b.c", r"a\.b\.c", "mlp.down_proj|q_proj", r"model\.layers\.0\.self_attn\.q_proj\."]
    rng = random.Random(0)
    for _ in range(400):
        keys = rng.sample(pool, rng.randint(0, 6))
        for module in modules:
            assert pattern_key(keys, module) == get_pattern_key(keys, module), (keys, module)


# point 7: tensors PEFT would not load, modules of zero size
@pytest.mark.parametrize("changes, expected", [
    ({"target_modules": ATTN}, "target_modules"),  # down_proj has tensors but is not targeted
    ({"target_modules": r".*\.(q|k|v|o)_proj"}, "a regex matched against the whole name"),
    ({"exclude_modules": ["down_proj"]}, "exclude_modules"),
    ({"exclude_modules": r".*\.layers\.1\..*"}, "exclude_modules"),
    ({"layers_to_transform": [0]}, "its layer 1 is not in layers_to_transform"),
    ({"layers_to_transform": 1, "layers_pattern": "layers"}, "its layer 0 is not in layers_to_transform"),
    ({"layers_to_transform": [0, 1], "layers_pattern": ["blocks"]}, "has no layer index"),
    ({"modules_to_save": ["down_proj"]}, "modules_to_save"),
], ids=["list", "regex", "exclude_list", "exclude_regex", "layers", "layers_pattern", "no_index", "modules_to_save"])
def test_tensors_of_modules_peft_would_not_adapt_are_refused(plain, tmp_path, changes, expected):
    path = edit_config(clone(plain, tmp_path / "untargeted"), **changes)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), "module 'model.layers.", expected, "PEFT would not adapt")


@pytest.mark.parametrize("changes", [{"target_modules": "all-linear"}, {"target_modules": r".*_proj"},
                                     {"target_modules": ["self_attn.q_proj", "k_proj", "v_proj", "o_proj", "mlp.down_proj"]},
                                     {"layers_to_transform": [1, 0], "layers_pattern": "layers"},
                                     {"exclude_modules": ["up_proj"]}], ids=["all_linear", "regex", "suffixes",
                                                                              "layers", "exclude_other"])
def test_configs_that_target_every_stored_module_are_read(plain, tmp_path, changes):
    path = edit_config(clone(plain, tmp_path / "targeted"), **changes)
    assert open_adapter(path).modules == open_adapter(plain).modules


def test_target_rules_are_peft_check_target_module_exists():
    from peft.tuners.tuners_utils import check_target_module_exists

    modules = [Q0, "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj", "model.layers.1.experts.0.up_proj",
               "model.blocks.2.attn.q_proj", "lm_head", "q_proj", "transformer.h.0.attn.c_attn"]
    grid = [dict(target_modules=t, exclude_modules=e, layers_to_transform=layers, layers_pattern=lp, modules_to_save=m)
            for t in (["q_proj"], ["self_attn.q_proj", "down_proj"], [Q0], r".*\.(q|v)_proj", r"model\.layers\.\d+\..*",
                      ["up_proj", "c_attn"], ["proj"])
            for e in (None, ["down_proj"], r".*layers\.1\..*", [])
            for layers in (None, [0], 1, [1, 10], [])
            for lp in (None, "layers", ["blocks", "layers"], "h")
            for m in (None, ["lm_head"], ["q_proj"])]
    compared = 0
    for fields in grid:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_config = LoraConfig(**fields)
        except ValueError:  # a combination PEFT refuses (open_adapter refuses it too)
            continue
        rules = ConfigRules(json.loads(json.dumps(fields)), PatternMatcher("x:"))
        for module in modules:
            assert (rules.not_targeted(module) is None) == bool(check_target_module_exists(peft_config, module)), \
                (fields, module, rules.not_targeted(module))
            compared += 1
    assert compared > 5000


@pytest.mark.parametrize("a_shape, b_shape", [((0, 32), (32, 0)), ((4, 0), (32, 4)), ((4, 32), (0, 4))],
                         ids=["rank_0", "in_features_0", "out_features_0"])
def test_modules_of_zero_size_are_refused(plain, tmp_path, a_shape, b_shape):
    path = clone(plain, tmp_path / "zero")

    def shrink(t):
        t[f"base_model.model.{Q0}.lora_A.weight"] = torch.zeros(a_shape)
        t[f"base_model.model.{Q0}.lora_B.weight"] = torch.zeros(b_shape)

    _rewrite(path, shrink)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), Q0, "zero size")


# point 14: every damaged, hostile or unreadable input is one line and exit 2, never a traceback
def _write_config_text(path: Path, text: str | bytes) -> None:
    (path / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())


def _config_text(path: Path, **raw: str) -> str:
    """adapter_config.json with fields replaced by raw JSON text (what json.dumps cannot write)."""
    config = json.loads((path / "adapter_config.json").read_text())
    text = json.dumps({k: v for k, v in config.items() if k not in raw})
    return text[:-1] + "".join(f', "{k}": {v}' for k, v in raw.items()) + "}"


def _nested_header(path: Path) -> None:
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    (path / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)


def _replace_weights(make):
    def damage(path: Path) -> None:
        (path / "adapter_model.safetensors").unlink()
        make(path / "adapter_model.safetensors")
    return damage


HOSTILE = {  # name: (damage, what the one line must say)
    "alpha_1e400": (lambda p: _write_config_text(p, _config_text(p, lora_alpha="1e400")),
                    "lora_alpha must be a finite number, got inf"),
    "int_of_5000_digits": (lambda p: _write_config_text(p, _config_text(p, r="1" + "0" * 5000)), "not valid JSON"),
    "alpha_of_400_digits": (lambda p: _write_config_text(p, _config_text(p, lora_alpha="9" * 400)),
                            "lora_alpha must be a finite number"),
    "config_nested_100k": (lambda p: _write_config_text(p, '{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000
                                                        + "}"), "nested too deeply"),
    "config_nested_50": (lambda p: _write_config_text(p, _config_text(p, eva_config="[" * 50 + "]" * 50)),
                         "nests more than 32 levels"),
    "config_not_utf8": (lambda p: _write_config_text(p, b'{"peft_type": "LORA", "r": "\xff\xfe"}'), "not UTF-8"),
    "config_a_directory": (lambda p: ((p / "adapter_config.json").unlink(), (p / "adapter_config.json").mkdir()),
                           "adapter_config.json is a directory"),
    "header_nested_100k": (_nested_header, "nested too deeply"),
    "weights_a_fifo": (_replace_weights(os.mkfifo), "adapter_model.safetensors is a FIFO"),
    "weights_a_directory": (_replace_weights(os.mkdir), "adapter_model.safetensors is a directory"),
    "weights_a_dangling_symlink": (_replace_weights(lambda w: os.symlink(w.parent / "gone", w)),
                                   "adapter_model.safetensors is a dangling symlink"),
    "weights_a_symlink_loop": (_replace_weights(lambda w: os.symlink(w.name, w)), "symlink loop"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_adapter_is_one_line_and_exit_2(plain, tmp_path, case, capsys):
    from coremerge.cli import main

    damage, expected = HOSTILE[case]
    path = clone(plain, tmp_path / "hostile")
    damage(path)
    with pytest.raises(AdapterError) as exc:
        open_adapter(path)
    one_line_naming(exc, str(path), expected)
    out = tmp_path / "out"
    for argv in (["inspect", str(path)], ["merge", str(plain), str(path), "--out", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and str(path) in err, err
    assert not out.exists()


@pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0, reason="needs setpriv and root")
@pytest.mark.parametrize("locked", [".", "adapter_config.json", "adapter_model.safetensors"])
def test_unreadable_adapter_is_one_line_and_exit_2(plain, tmp_path, locked):
    # Tests run as root, whom permission bits do not stop: drop the capabilities that let root read anything.
    path = clone(plain, tmp_path / "locked")
    os.chmod(path / locked, 0)
    try:
        proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                               "--inh-caps=-dac_override,-dac_read_search", "--", sys.executable, "-m", "coremerge",
                               "inspect", str(path)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    finally:
        os.chmod(path / locked, 0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(path) in proc.stderr and "permission denied" in proc.stderr.lower()


def test_fifo_weights_do_not_hang_the_command(plain, tmp_path):
    path = clone(plain, tmp_path / "fifo")
    _replace_weights(os.mkfifo)(path)
    proc = subprocess.run([sys.executable, "-m", "coremerge", "inspect", str(path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "is a FIFO (named pipe), not a regular file" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------- writing
def random_merged(src, ranks: list[int], seed: int) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    return {m: LowRank(a=torch.randn(q, s.in_features, generator=g), b=torch.randn(s.out_features, q, generator=g))
            for (m, s), q in zip(src.modules.items(), ranks, strict=True)}


def test_write_round_trip_through_peft(plain, tmp_path):
    src = open_adapter(plain)
    merged = random_merged(src, [3, 3, 5, 3, 1, 2, 3, 0, 7, 3], seed=0)  # mixed, one all-zero module
    config = adapter_config_for([src], {m: lr.rank for m, lr in merged.items()})
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (3, 3, False)
    assert sorted(config["rank_pattern"].values()) == [1, 1, 2, 5, 7] and config["alpha_pattern"] == config[
        "rank_pattern"]
    out = write_adapter(tmp_path / "merged", merged, config=config, report={"method": "ta"}, dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "merge_report.json"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(make_tiny_llama(), str(out))
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    result = model.load_adapter(str(out), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    layers = peft_layers(model)
    for m, lr in merged.items():
        torch.testing.assert_close(layers[m].get_delta_weight("default"), lr.delta(), rtol=1e-5, atol=1e-6)
    reread = open_adapter(out)  # our reader agrees with our writer
    assert {s.scale for s in reread.modules.values()} == {1.0}
    assert {m: s.rank for m, s in reread.modules.items()} == {m: max(1, lr.rank) for m, lr in merged.items()}


def test_write_refuses_existing_dir_and_force_replaces_it(plain, tmp_path):
    src = open_adapter(plain)
    first, second = random_merged(src, [2] * 10, seed=1), random_merged(src, [4] * 10, seed=2)
    config1 = adapter_config_for([src], {m: 2 for m in first})
    config2 = adapter_config_for([src], {m: 4 for m in second})
    report = {"coremerge_version": "0", "inputs": []}  # what makes a directory one this tool wrote
    out = write_adapter(tmp_path / "out", first, config=config1, report=report, dtype=torch.float32)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="exists; pass --force"):
        write_adapter(out, second, config=config2, report=None, dtype=torch.float32)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    write_adapter(out, second, config=config2, report=None, dtype=torch.float32, force=True)
    assert not (out / "merge_report.json").exists()  # the old directory is gone, not merged into
    assert open_adapter(out).modules[Q0].rank == 4
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup dirs left
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an adapter directory"):
        write_adapter(tmp_path / "precious", second, config=config2, report=None, dtype=torch.float32, force=True)
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("existing", [False, True])
def test_write_failure_leaves_nothing_behind(plain, tmp_path, existing):
    src = open_adapter(plain)
    merged = random_merged(src, [2] * 10, seed=3)
    config = adapter_config_for([src], {m: 2 for m in merged})
    out = tmp_path / "out"
    if existing:
        write_adapter(out, merged, config=config, report={"coremerge_version": "0", "inputs": []}, dtype=torch.float32)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None

    def failing():  # the weights file is half written when this module's turn comes
        raise OSError("disk full")

    middle = sorted(merged)[len(merged) // 2]
    broken = dict(merged)
    broken[middle] = StoredLowRank(rank=2, in_features=merged[middle].in_features,
                                   out_features=merged[middle].out_features, energy_kept=None, loader=failing)
    with pytest.raises(OSError, match="disk full"):
        write_adapter(out, broken, config=config, report=None, dtype=torch.float32, force=True)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existing else [])
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_write_is_deterministic(plain, tmp_path):
    src = open_adapter(plain)
    merged = random_merged(src, [2, 3] * 5, seed=4)
    config = adapter_config_for([src], {m: lr.rank for m, lr in merged.items()})
    a = write_adapter(tmp_path / "a", merged, config=config, report={"x": 1}, dtype=torch.bfloat16)
    b = write_adapter(tmp_path / "b", dict(reversed(merged.items())), config=dict(reversed(config.items())),
                      report={"x": 1}, dtype=torch.bfloat16)
    for name in ("adapter_model.safetensors", "adapter_config.json", "merge_report.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    st = a / "adapter_model.safetensors"
    assert file_sha256(st) == hashlib.sha256(st.read_bytes()).hexdigest()
    assert open_adapter(a).dtype == torch.bfloat16
    with safetensors.safe_open(st, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_streamed_weights_are_save_files_bytes(plain, tmp_path, dtype):
    # The writer streams module by module; safetensors' own save_file, given every tensor at once,
    # must produce the very same file (mixed ranks, an all-zero module written as one zero rank).
    src = open_adapter(plain)
    merged = random_merged(src, [3, 0, 5, 3, 1, 2, 3, 4, 7, 3], seed=8)
    config = adapter_config_for([src], {m: lr.rank for m, lr in merged.items()})
    out = write_adapter(tmp_path / "out", merged, config=config, report=None, dtype=dtype)
    tensors = {}
    for m, lr in merged.items():
        a, b = (lr.a, lr.b) if lr.rank else (torch.zeros(1, lr.in_features), torch.zeros(lr.out_features, 1))
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.to(dtype).contiguous()
    safetensors.torch.save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    assert (out / "adapter_model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_written_weights_hash_is_taken_as_they_are_written(plain, tmp_path, monkeypatch):
    # write_adapter hashes the weights on the way out; whoever records the output's sha256 (the
    # pipeline's assembly) gets it without reading the file back, while the file is unchanged.
    import coremerge.peft_io as peft_io

    src = open_adapter(plain)
    merged = random_merged(src, [2, 3] * 5, seed=5)
    config = adapter_config_for([src], {m: lr.rank for m, lr in merged.items()})
    st = write_adapter(tmp_path / "out", merged, config=config, report=None, dtype=torch.bfloat16) / "adapter_model.safetensors"
    expected = hashlib.sha256(st.read_bytes()).hexdigest()
    from coremerge import safetensors_file

    monkeypatch.setattr(safetensors_file, "_hash_fd", lambda fd: pytest.fail("read back a file this process wrote"))
    assert peft_io.known_sha256(st) == expected
    monkeypatch.undo()
    st.write_bytes(st.read_bytes()[:-2] + b"\0\0")  # rewritten in place: read and hashed again
    stat = st.stat()  # (a newer mtime for sure: the kernel's clock for it is coarse)
    os.utime(st, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert peft_io.known_sha256(st) == hashlib.sha256(st.read_bytes()).hexdigest() != expected


def test_stored_modules_are_loaded_one_at_a_time(plain, tmp_path):
    # Lazily stored modules give the same bytes as in-memory ones, each loaded exactly once and
    # dropped before the next is loaded (what lets the pipeline write a 70B adapter from its shards).
    src = open_adapter(plain)
    merged = random_merged(src, [3, 2, 5, 3, 1, 2, 3, 4, 7, 3], seed=9)
    config = adapter_config_for([src], {m: lr.rank for m, lr in merged.items()})
    loads, alive = [], []

    class Tracked(LowRank):
        def __del__(self):
            alive.remove(id(self))

    def loader(m):
        def load():
            loads.append(m)
            assert not alive, "a module was still held when the next one was loaded"
            lr = Tracked(a=merged[m].a.clone(), b=merged[m].b.clone())
            alive.append(id(lr))
            return lr
        return load

    stored = {m: StoredLowRank(rank=lr.rank, in_features=lr.in_features, out_features=lr.out_features,
                               energy_kept=None, loader=loader(m)) for m, lr in merged.items()}
    lazy = write_adapter(tmp_path / "lazy", stored, config=config, report=None, dtype=torch.bfloat16)
    eager = write_adapter(tmp_path / "eager", merged, config=config, report=None, dtype=torch.bfloat16)
    assert sorted(loads) == sorted(merged) and len(loads) == len(merged)
    assert (lazy / "adapter_model.safetensors").read_bytes() == (eager / "adapter_model.safetensors").read_bytes()


def test_stored_module_with_a_wrong_shape_is_refused_and_nothing_written(plain, tmp_path):
    src = open_adapter(plain)
    merged = random_merged(src, [2] * 10, seed=10)
    config = adapter_config_for([src], {m: 2 for m in merged})
    first = next(iter(merged))
    stored = dict(merged)
    stored[first] = StoredLowRank(rank=2, in_features=merged[first].in_features + 1,
                                  out_features=merged[first].out_features, energy_kept=None,
                                  loader=lambda: merged[first])
    with pytest.raises(ValueError, match="expected"):
        write_adapter(tmp_path / "out", stored, config=config, report=None, dtype=torch.float32)
    assert list(tmp_path.iterdir()) == []


def test_config_falls_back_to_module_list_and_agrees_only_on_common_fields(root, plain):
    layer0 = save_lora_adapter(root, "layer0", LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0],
                                                          task_type="CAUSAL_LM"), seed=15)
    sources = [open_adapter(plain), open_adapter(layer0)]
    modules = union_modules(sources)
    config = adapter_config_for(sources, {m: 2 for m in modules})
    assert config["target_modules"] == modules  # layers_to_transform: the exact module list
    assert config["task_type"] is None and config["fan_in_fan_out"] is False and config["peft_type"] == "LORA"
    assert adapter_config_for(sources[1:], {Q0: 2})["task_type"] == "CAUSAL_LM"


def test_weights_header_is_parsed_once_per_version_and_nothing_stays_mapped(plain, tmp_path, monkeypatch):
    # Reading module after module parses the file's header once; a rewritten file (another version)
    # is refused by the source opened before (point 2) and parsed again when opened anew, its new values
    # read. Tensors are read into memory of their own: the file is not left mapped into the process
    # (a 70B adapter set would count in its RSS).
    from coremerge import safetensors_file

    monkeypatch.setattr(safetensors_file, "RACY_NS", 0)  # the copy is seconds old: cache it all the same
    parsed = []
    real = safetensors_file.read_header
    monkeypatch.setattr(safetensors_file, "read_header", lambda fd, size, where: parsed.append(where) or real(fd, size, where))
    copy = tmp_path / "copy"
    shutil.copytree(plain, copy)
    src = open_adapter(copy)
    first = {m: load_factors(src, m) for m in list(src.modules)[:3]}
    assert len(parsed) == 1
    with open("/proc/self/maps") as maps:
        assert str(src.weights_file) not in maps.read()
    tensors = safetensors.torch.load_file(str(src.weights_file))
    safetensors.torch.save_file({k: 2 * t for k, t in tensors.items()}, str(src.weights_file), metadata={"format": "pt"})
    with pytest.raises(AdapterChangedError):
        load_factors(src, next(iter(first)))
    src = open_adapter(copy)
    again = {m: load_factors(src, m) for m in first}
    assert len(parsed) == 2
    for m in first:
        assert torch.equal(again[m].a, 2 * first[m].a)
        spec = src.modules[m]
        assert torch.equal(again[m].a, 2 * tensors[spec.a_key].float())


def test_input_sha256_is_the_files_hash_and_follows_a_rewrite(tmp_path):
    from coremerge.peft_io import known_sha256 as input_sha256

    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"first version")
    assert input_sha256(f) == hashlib.sha256(b"first version").hexdigest()
    assert input_sha256(f) == hashlib.sha256(b"first version").hexdigest()  # from the cache
    f.write_bytes(b"the second, longer version")  # a new size and mtime: hashed again
    assert input_sha256(f) == hashlib.sha256(b"the second, longer version").hexdigest()


def test_float16_overflow_is_refused_and_nothing_written(plain, tmp_path):
    src = open_adapter(plain)
    merged = random_merged(src, [2] * 10, seed=11)
    first = next(iter(merged))
    merged[first] = LowRank(a=merged[first].a, b=merged[first].b * 1e6)  # finite in float32, inf in float16
    config = adapter_config_for([src], {m: 2 for m in merged})
    with pytest.raises(ValueError, match=f"{first}.*NaN or Inf in torch.float16"):
        write_adapter(tmp_path / "out", merged, config=config, report=None, dtype=torch.float16)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_check_is_exact(dtype):
    from coremerge.peft_io import all_finite

    big = torch.finfo(dtype).max
    assert all_finite(torch.full((4, 3), big, dtype=dtype))  # finite, though their sum overflows
    assert all_finite(torch.tensor([[big, -big]], dtype=dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.zeros(5, 7, dtype=dtype)
        t[3, 2] = bad
        assert not all_finite(t)
    t = torch.zeros(2, 2, dtype=dtype)
    t[0, 0], t[1, 1] = float("inf"), float("-inf")  # inf - inf: a NaN sum, still not finite
    assert not all_finite(t)
