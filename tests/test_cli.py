"""The `coremerge` command as a user runs it: real PEFT adapters of a tiny random Llama,
merged by the installed command, loaded back with PeftModel.from_pretrained."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft_factories import make_tiny_llama, save_adapter as _save_adapter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def tiny_llama():
    return make_tiny_llama(0)


def save_adapter(path: Path, lora_config, seed: int) -> Path:
    return _save_adapter(path.parent, path.name, lora_config, seed)


def coremerge_cmd() -> list[str]:
    exe = shutil.which("coremerge")
    return [exe] if exe else [sys.executable, "-m", "coremerge"]


def run_cli(*args, check=True):
    proc = subprocess.run([*coremerge_cmd(), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    LoraConfig = peft.LoraConfig
    return [
        save_adapter(root / "a", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=1),
        save_adapter(root / "b", LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=TARGETS,
                                            rank_pattern={"q_proj": 6}, alpha_pattern={"layers.1.self_attn.v_proj": 3}),
                     seed=2),
        save_adapter(root / "c", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]), seed=3),
    ]


def own_delta(adapter: Path) -> dict[str, torch.Tensor]:
    """Each adapter's update per weight, computed by PEFT itself (merge_and_unload minus base)."""
    base = tiny_llama().state_dict()
    merged = peft.PeftModel.from_pretrained(tiny_llama(), adapter).merge_and_unload().state_dict()
    return {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_ta_merge_loads_in_peft_and_equals_base_plus_every_adapters_delta(adapters, tmp_path):
    out = tmp_path / "merged"
    run_cli("merge", *adapters, "--method", "ta", "--out", out)
    deltas = [own_delta(a) for a in adapters]
    expected = tiny_llama()
    with torch.no_grad():
        state = expected.state_dict()
        for delta in deltas:
            for key, d in delta.items():
                state[key] += d
        expected.load_state_dict(state)
    model = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(expected, ids), rtol=1e-4, atol=1e-4)
    # and it is not the base model: the adapters changed the logits
    assert (logits(model, ids) - logits(tiny_llama(), ids)).abs().max() > 1e-2

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is False
    assert config["r"] == config["lora_alpha"]
    report = json.loads((out / "merge_report.json").read_text())
    assert report["method"] == "ta" and report["space"] == "core"
    assert [i["sha256"] for i in report["inputs"]] == [
        __import__("hashlib").sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest() for a in adapters]
    # q_proj has all three adapters: 4 + 6 + 2; k_proj only a and b: 4 + 8
    assert report["modules"]["model.layers.0.self_attn.q_proj"]["rank"] == 12
    assert report["modules"]["model.layers.0.self_attn.k_proj"]["rank"] == 12
    assert report["modules"]["model.layers.0.self_attn.k_proj"]["adapters"] == 2


@pytest.mark.parametrize("method", ["ties", "dare_ties", "tsv", "iso_c", "iso_cts", "cart"])
def test_every_method_writes_an_adapter_peft_loads_exactly(adapters, tmp_path, method):
    out = tmp_path / method
    run_cli("merge", *adapters, "--method", method, "--alpha", "0.9", "--out", out, "--seed", "3")
    tensors = load_file(out / "adapter_model.safetensors")
    model = peft.PeftModel.from_pretrained(tiny_llama(), out)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    torch.testing.assert_close(layer.get_delta_weight("default"), b @ a, rtol=1e-6, atol=1e-7)


def test_dare_is_reproducible_across_processes(adapters, tmp_path):
    for name in ("x", "y"):
        run_cli("merge", *adapters, "--method", "dare", "--density", "0.5", "--seed", "11", "--out", tmp_path / name)
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (tmp_path / "y/adapter_model.safetensors").read_bytes()
    run_cli("merge", *adapters, "--method", "dare", "--density", "0.5", "--seed", "12", "--out", tmp_path / "z")
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() != (tmp_path / "z/adapter_model.safetensors").read_bytes()


def test_weights_rank_and_dtype_options(adapters, tmp_path):
    out = tmp_path / "w"
    run_cli("merge", *adapters, "--weights", "1,0,0", "--rank", "3", "--dtype", "bfloat16", "--out", out)
    tensors = load_file(out / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    report = json.loads((out / "merge_report.json").read_text())
    assert report["weights"] == [1.0, 0.0, 0.0] and report["rank"] == 3
    mod = report["modules"]["model.layers.0.self_attn.q_proj"]
    assert mod["rank"] == 3 and 0.0 < mod["energy_kept"] <= 1.0
    # adapter a alone has rank 4 in q_proj: rank 3 keeps less than all of it
    assert mod["energy_kept"] < 1.0


def test_existing_output_needs_force(adapters, tmp_path):
    out = tmp_path / "o"
    run_cli("merge", *adapters[:1], "--out", out)
    proc = run_cli("merge", *adapters[:1], "--out", out, check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr
    run_cli("merge", *adapters[:1], "--out", out, "--force")


def test_inspect_lists_modules_and_says_they_merge(adapters):
    out = run_cli("inspect", *adapters).stdout
    assert "model.layers.1.self_attn.v_proj" in out and "can be merged together" in out
    assert "6/" in out  # b's rank_pattern gives q_proj rank 6


def _bad(args, tmp_path, *expect):
    out = tmp_path / "never"
    proc = run_cli("merge", *args, "--out", out, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in expect:
        assert word in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".never", "never"))]
    return lines[0]


def test_bad_inputs_one_line_exit_2_nothing_written(adapters, tmp_path):
    _bad([tmp_path / "missing"], tmp_path, "missing")
    nocfg = tmp_path / "nocfg"
    shutil.copytree(adapters[0], nocfg)
    (nocfg / "adapter_config.json").unlink()
    _bad([nocfg], tmp_path, "nocfg", "adapter_config.json")
    badjson = tmp_path / "badjson"
    shutil.copytree(adapters[0], badjson)
    (badjson / "adapter_config.json").write_text("{not json")
    _bad([badjson], tmp_path, "badjson")
    cut = tmp_path / "cut"
    shutil.copytree(adapters[0], cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _bad([cut], tmp_path, "cut")
    _bad([*adapters, "--method", "nope"], tmp_path, "nope", "tsv")
    _bad([*adapters, "--method", "ties", "-p", "bogus=1"], tmp_path, "bogus", "density")
    _bad([*adapters, "--method", "ties", "--density", "1.5"], tmp_path, "density")
    _bad([*adapters, "--weights", "1,2"], tmp_path, "weights")


def test_nan_and_shape_mismatch_are_refused(adapters, tmp_path):
    nan = tmp_path / "nan"
    shutil.copytree(adapters[0], nan)
    tensors = load_file(nan / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, nan / "adapter_model.safetensors")
    _bad([adapters[1], nan], tmp_path, "nan", "model.layers.0.self_attn.k_proj")

    other = tmp_path / "wide"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(other)
    _bad([adapters[0], other], tmp_path, "wide", "q_proj")


# --- issue 12: outputs that would destroy something, and bad --out / --device (points 1 and 14) ----------
def tree_sha256(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(args, *expect) -> str:
    proc = run_cli("merge", *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in expect:
        assert word in lines[0], lines[0]
    return lines[0]


def test_an_output_that_is_an_input_is_refused_even_with_force(adapters, tmp_path):
    a, b = shutil.copytree(adapters[0], tmp_path / "in" / "a"), shutil.copytree(adapters[1], tmp_path / "in" / "b")
    (a / "notes.txt").write_text("everything else in a")
    (tmp_path / "link").symlink_to(a)
    before = tree_sha256(tmp_path / "in")
    cases = [(a, "is adapter"), (a / "merged", "lies inside adapter"), (tmp_path / "in", "contains adapter"),
             (tmp_path / "link", "is adapter"), (tmp_path / "link" / "merged", "lies inside adapter")]
    for out, relation in cases:
        _refused([a, b, "--out", out, "--force"], str(out), relation, str(a))
        assert tree_sha256(tmp_path / "in") == before  # nothing of the inputs changed, nothing added
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a", "b"]


def test_force_replaces_only_a_merged_adapter_this_tool_wrote(adapters, tmp_path):
    merged = tmp_path / "merged"
    run_cli("merge", *adapters[:2], "--out", merged)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("the user's")
    other_adapter = shutil.copytree(adapters[2], tmp_path / "other-adapter")  # not an input of this merge
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(merged)
    before = {p.name: tree_sha256(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_mtime_ns
              for p in tmp_path.iterdir()}
    for out, words in [(tmp_path / "notes", "even with --force"), (other_adapter, "even with --force"),
                       (tmp_path / "file", "is not a directory"), (tmp_path / "link", "is a symlink"),
                       (tmp_path / "file" / "merged", "is a file, not a directory")]:
        _refused([*adapters[:2], "--out", out, "--force"], str(out), words)
    after = {p.name: tree_sha256(p) if p.is_dir() and not p.is_symlink() else p.lstat().st_mtime_ns
             for p in tmp_path.iterdir()}
    assert after == before  # every one untouched, no temp directory left
    first = (merged / "adapter_model.safetensors").read_bytes()
    run_cli("merge", *adapters[:2], "--alpha", "0.5", "--out", merged, "--force")
    assert json.loads((merged / "merge_report.json").read_text())["alpha"] == 0.5
    assert (merged / "adapter_model.safetensors").read_bytes() != first


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:99", "cuda:-1", "cpu:0"])
def test_a_bad_device_is_one_line(adapters, tmp_path, device):
    _bad([*adapters[:2], "--device", device], tmp_path, f"device '{device}'")


def test_an_out_that_cannot_be_written_is_found_before_the_merge(adapters, tmp_path, monkeypatch, capsys):
    import tempfile

    from coremerge import cli, merge

    merged = []
    monkeypatch.setattr(merge, "merge_module_of", lambda *args, **kwargs: merged.append(args[1]))

    def denied(*args, **kwargs):  # what a read-only or foreign directory answers (root passes access checks)
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    status = cli.main(["merge", *map(str, adapters[:2]), "--out", str(tmp_path / "ro" / "merged")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0] == (f"coremerge: error: cannot write output {tmp_path}/ro/merged: {tmp_path}/ro: Permission denied; "
                      f"choose a directory you can write")
    assert merged == []  # refused before any module was merged


def test_density_given_twice_is_refused(adapters, tmp_path):
    # issue 12, point 7: which one would win was not said; now neither does
    _bad([*adapters[:2], "--method", "ties", "--density", "0.3", "-p", "density=0.7"], tmp_path,
         "--density 0.3 and -p density=0.7 both set density")
    _bad([*adapters[:2], "--method", "ties", "-p", "density=0.3", "-p", "density=0.7"], tmp_path,
         "-p density is given more than once")


@pytest.fixture
def small_disk(tmp_path):
    """A 12 KiB tmpfs (as root; skipped otherwise): the merged adapter does not fit."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and tmpfs to make a full disk")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_and_leaves_nothing(adapters, small_disk):
    # issue 12, point 14: the weights (~30 KiB in float32) do not fit in 12 KiB
    proc = run_cli("merge", *adapters, "--method", "tsv", "--dtype", "float32", "--out", small_disk / "merged",
                   check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "No space left on device" in lines[0] and str(small_disk / "merged") in lines[0]
    assert list(small_disk.iterdir()) == []  # no half-written adapter, no temp directory
