"""coremerge.hub without the network: a Hugging Face cache laid out by hand, HF_HUB_OFFLINE=1, and a
recording stand-in for HfApi. Any socket connection fails the test."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import torch
from peft_factories import block_network
from safetensors.torch import save_file

from coremerge import hub
from coremerge.errors import AdapterError
from coremerge.peft_io import load_factors, open_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    block_network(monkeypatch)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))  # read once, at import
    return cache


def write_tiny_adapter(folder: Path, *, scale_alpha: int = 4) -> Path:
    """A hand-made LoRA adapter (r=2, alpha=4: scale 2) with one module."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": scale_alpha, "target_modules": ["q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{MODULE}.lora_A.weight": torch.randn(2, 8, generator=g),
               f"base_model.model.{MODULE}.lora_B.weight": torch.randn(6, 2, generator=g)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def cache_repo(cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """The hub cache layout: models--org--name/{refs/<ref>, snapshots/<commit>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = write_tiny_adapter(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def forbid_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("snapshot_download must not be called for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_existing_directory_is_used_as_is(tmp_path, monkeypatch):
    forbid_download(monkeypatch)
    folder = write_tiny_adapter(tmp_path / "org" / "name")  # even a path that looks like a hub id
    monkeypatch.chdir(tmp_path)
    assert hub.resolve("org/name") == Path("org/name")
    assert open_adapter("org/name").path == Path("org/name")
    assert hub.resolve(str(folder)) == folder


def test_resolves_hub_id_from_offline_cache(hf_cache):
    snapshot = cache_repo(hf_cache, "org/name")
    assert hub.resolve("org/name") == snapshot
    assert hub.resolve(f"org/name@{COMMIT}") == snapshot
    assert hub.resolve("org/name@main") == snapshot
    src = open_adapter("org/name")
    assert src.name == "org/name" and src.path == snapshot and list(src.modules) == [MODULE]
    assert src.modules[MODULE].scale == 2.0
    local = open_adapter(snapshot)
    torch.testing.assert_close(load_factors(src, MODULE).delta(), load_factors(local, MODULE).delta())


@pytest.mark.parametrize("spec", ["org/missing", "org/name@v2", f"org/missing@{COMMIT}"])
def test_missing_hub_id_offline_is_one_line_adapter_error(hf_cache, spec):
    cache_repo(hf_cache, "org/name")
    with pytest.raises(AdapterError) as exc:
        open_adapter(spec)
    message = str(exc.value)
    assert "\n" not in message and repr(spec) in message and "not found on the Hugging Face Hub" in message


@pytest.mark.parametrize("spec", ["./nope", "/no/such/adapter/dir", "a/b/c", "~/nope"])
def test_missing_path_never_asks_the_hub(spec, monkeypatch):
    forbid_download(monkeypatch)
    with pytest.raises(AdapterError) as exc:
        hub.resolve(spec)
    assert "\n" not in str(exc.value) and repr(spec) in str(exc.value) and "no such directory" in str(exc.value)


def test_a_file_is_not_an_adapter(tmp_path, monkeypatch):
    forbid_download(monkeypatch)
    folder = write_tiny_adapter(tmp_path / "a")
    with pytest.raises(AdapterError, match="is a file"):
        hub.resolve(str(folder / "adapter_model.safetensors"))


def test_parse_hub_id():
    assert hub.parse_hub_id("org/name") == ("org/name", None)
    assert hub.parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    assert hub.parse_hub_id("my-org/llama.3_lora@v1.0") == ("my-org/llama.3_lora", "v1.0")
    for not_an_id in ("name", "./org/name", "/org/name", "org/name/sub", "org/", "org/name@", "~org/name"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id


@pytest.fixture
def recorded(monkeypatch) -> list:
    """HfApi.create_repo / upload_folder replaced by recorders: (method, kwargs) per call."""
    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_creates_repo_and_uploads_the_folder(tmp_path, recorded):
    folder = write_tiny_adapter(tmp_path / "merged")
    url = hub.push_to_hub(folder, "org/merged", private=True)
    assert url == "https://huggingface.co/org/merged"
    (first, create_kwargs), (second, upload_kwargs) = recorded
    assert (first, second) == ("create_repo", "upload_folder")
    assert create_kwargs["repo_id"] == "org/merged" and create_kwargs["private"] is True
    assert create_kwargs["exist_ok"] is True
    assert upload_kwargs["repo_id"] == "org/merged" and Path(upload_kwargs["folder_path"]) == folder


def test_push_to_hub_refuses_a_folder_without_adapter(tmp_path, recorded):
    with pytest.raises(AdapterError, match="adapter_config.json"):
        hub.push_to_hub(tmp_path, "org/merged")
    assert recorded == []


def test_push_to_hub_failure_is_one_line(tmp_path, monkeypatch, recorded):
    def fail(self, **kwargs):
        raise OSError("403 Forbidden\nyou do not have write access")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", fail)
    with pytest.raises(AdapterError) as exc:
        hub.push_to_hub(write_tiny_adapter(tmp_path / "m"), "org/merged")
    assert "\n" not in str(exc.value) and "org/merged" in str(exc.value) and "403 Forbidden" in str(exc.value)
