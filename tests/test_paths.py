"""coremerge.paths: an output directory that is, contains or lies inside an input adapter is refused,
however the path reaches it (issue 12, point 1)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

from coremerge.paths import OutputOverlapError, check_output_not_input
from coremerge.peft_io import open_adapter
from coremerge.synthetic import llama_shapes, write_lora_adapter

SHAPES = llama_shapes(hidden=16, intermediate=24, layers=1, kv_dim=8)


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    return write_lora_adapter(tmp_path / "adapters" / "a", SHAPES, rank=2, seed=1)


def refused(out: Path, inputs, relation: str) -> str:
    with pytest.raises(OutputOverlapError) as info:
        check_output_not_input(out, inputs, where="--out")
    message = str(info.value)
    assert "\n" not in message and f" {relation} adapter " in message, message
    assert isinstance(info.value, ValueError)  # the CLI's exit 2
    return message


@pytest.mark.parametrize("opened", [False, True])
def test_is_inside_and_contains_are_refused_apart_is_fine(adapter, tmp_path, opened):
    inputs = [open_adapter(adapter)] if opened else [str(adapter)]
    refused(adapter, inputs, "is")
    refused(adapter / "merged", inputs, "lies inside")
    refused(adapter / "x" / "y", inputs, "lies inside")  # not there yet: still inside
    refused(tmp_path / "adapters", inputs, "contains")
    refused(tmp_path, inputs, "contains")
    refused(Path(f"{adapter}/../a/."), inputs, "is")  # spelled differently
    check_output_not_input(tmp_path / "merged", inputs)  # a sibling: fine
    check_output_not_input(tmp_path / "adapters" / "a-merged", inputs)  # a name that only starts the same


def test_symlinks_to_an_adapter_or_into_it_are_followed(adapter, tmp_path):
    (tmp_path / "link").symlink_to(adapter)
    refused(tmp_path / "link", [str(adapter)], "is")
    refused(tmp_path / "link" / "merged", [str(adapter)], "lies inside")
    refused(adapter, [str(tmp_path / "link")], "is")  # the input given through the link
    (tmp_path / "parent-link").symlink_to(tmp_path / "adapters")
    refused(tmp_path / "parent-link" / "a", [open_adapter(adapter)], "is")


def test_a_weights_file_that_is_a_symlink_counts_its_real_directory(adapter, tmp_path):
    # adapter_model.safetensors as the Hugging Face cache keeps it: a link into blobs/
    blobs = tmp_path / "cache" / "blobs"
    blobs.mkdir(parents=True)
    shutil.move(adapter / "adapter_model.safetensors", blobs / "0123abcd")
    (adapter / "adapter_model.safetensors").symlink_to(blobs / "0123abcd")
    src = open_adapter(adapter)
    refused(blobs, [src], "is")
    refused(blobs / "merged", [src], "lies inside")
    refused(tmp_path / "cache", [str(adapter)], "contains")  # given as a path, not opened: the same rule
    check_output_not_input(tmp_path / "cache" / "merged", [src])


def test_a_hub_adapter_is_checked_where_its_files_are(adapter, tmp_path):
    # an opened Hub adapter: its name is the id, its path the local cache snapshot
    src = dataclasses.replace(open_adapter(adapter), name="org/name")
    message = refused(adapter / "out", [src], "lies inside")
    assert "'org/name'" in message and str(adapter) in message
    check_output_not_input(adapter / "out", ["org/name"])  # an id not opened: nothing to compare


def test_a_bind_mount_like_second_name_is_caught_by_identity(adapter, tmp_path, monkeypatch):
    # a bind mount gives one directory two unrelated paths: compare (device, inode), not only paths
    other = tmp_path / "mnt"
    other.mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # /mnt behaves as a bind mount of the adapter directory
        return real_stat(adapter if Path(path) == other else path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    refused(other, [str(adapter)], "is")
    refused(other / "merged", [str(adapter)], "lies inside")
