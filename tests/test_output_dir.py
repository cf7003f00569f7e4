"""Writing a merged adapter directory (coremerge.peft_io's writing part, through merge_to_dir): --force
replaces only what this tool wrote, the old directory is exchanged in one step, and what a killed
writer leaves is recognised and removed by the next run (issue 12, points 1, 5 and 14)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coremerge import merge as merge_mod
from coremerge import peft_io
from coremerge.merge import MergeOptions, finish, merge_to_dir, open_all
from coremerge.paths import OutputPathError
from coremerge.synthetic import llama_shapes, write_lora_adapter

SHAPES = llama_shapes(hidden=32, intermediate=48, layers=2, kv_dim=16)
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_lora_adapter(tmp_path / "in" / "a", SHAPES, rank=4, seed=1),
            write_lora_adapter(tmp_path / "in" / "b", SHAPES, rank=2, seed=2)]


def digest(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file, or the link) and what it holds: sha256, or the link's target."""
    if path.is_symlink():
        return {".": f"-> {os.readlink(path)}"}
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): (f"-> {os.readlink(p)}" if p.is_symlink() else
                                       hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(path.rglob("*"))}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_force_replaces_a_merged_adapter_or_an_empty_directory(adapters, tmp_path):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    before = digest(out)
    with pytest.raises(ValueError, match="exists; pass --force"):
        merge_to_dir(adapters, out, MergeOptions(alpha=0.5))
    assert digest(out) == before
    merge_to_dir(adapters, out, MergeOptions(alpha=0.5), force=True)
    assert json.loads((out / "merge_report.json").read_text())["alpha"] == 0.5
    assert digest(out)["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    (tmp_path / "empty").mkdir()
    merge_to_dir(adapters, tmp_path / "empty", MergeOptions(), force=True)
    written = digest(tmp_path / "empty")  # the first merge again: the same bytes (the report's timings differ)
    assert [written[k] == before[k] for k in ("adapter_model.safetensors", "adapter_config.json")] == [True, True]


def _not_ours(tmp_path: Path, adapters: list[Path]) -> dict[str, Path]:
    cases = {}
    cases["notes"] = tmp_path / "notes"
    cases["notes"].mkdir()
    (cases["notes"] / "todo.txt").write_text("the user's")
    cases["an adapter"] = tmp_path / "adapter-copy"  # has adapter_config.json: the old rule replaced it
    cases["an adapter"].mkdir()
    for f in adapters[0].iterdir():
        (cases["an adapter"] / f.name).write_bytes(f.read_bytes())
    cases["another report"] = tmp_path / "other-report"  # a merge_report.json that is not ours
    cases["another report"].mkdir()
    (cases["another report"] / "adapter_config.json").write_text("{}")
    (cases["another report"] / "merge_report.json").write_text('{"run": 1}')
    cases["a file"] = tmp_path / "file"
    cases["a file"].write_text("x")
    merged = merge_to_dir(adapters, tmp_path / "real-merged", MergeOptions())
    cases["a symlink to a merged adapter"] = tmp_path / "link"
    cases["a symlink to a merged adapter"].symlink_to(merged)
    return cases


def test_force_refuses_what_this_tool_did_not_write(adapters, tmp_path):
    for what, out in _not_ours(tmp_path, adapters).items():
        before = digest(out)
        merged_before = digest(tmp_path / "real-merged")
        with pytest.raises(ValueError) as info:
            merge_to_dir(adapters, out, MergeOptions(alpha=0.5), force=True)
        message = str(info.value)
        assert "\n" not in message and str(out) in message, (what, message)
        assert "not a directory" in message or "symlink" in message or "even with --force" in message, message
        assert digest(out) == before, what
        assert digest(tmp_path / "real-merged") == merged_before, what
        assert leftovers(out) == [], what


def test_owned_lets_the_pipeline_replace_a_damaged_output_it_wrote(adapters, tmp_path):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    (out / "merge_report.json").unlink()  # damaged: no longer recognisable as ours
    sources = open_all(adapters)
    options = MergeOptions().checked(len(sources))
    merged = {m: merge_mod.merge_module_of(sources, m, options) for m in peft_io.union_modules(sources)}
    import torch

    args = dict(out_dtype=torch.float32, timings={}, force=True)
    with pytest.raises(ValueError, match="even with --force"):
        finish(out, sources, options, merged, **args)
    asked = []
    finish(out, sources, options, merged, owned=lambda p: asked.append(p) or True, **args)
    assert asked and set(asked) == {out.resolve()} and peft_io.is_merged_adapter(out)


def test_temp_directories_name_their_host_and_pid(adapters, tmp_path, monkeypatch):
    seen = []
    real = peft_io._save_streamed

    def spy(path, *args):
        seen.append(path.parent.name)
        return real(path, *args)

    monkeypatch.setattr(peft_io, "_save_streamed", spy)
    merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    assert re.fullmatch(rf"\.merged\.tmp-{re.escape(HOST)}-{os.getpid()}-[a-z0-9_]+", seen[0]), seen


def test_an_existing_output_is_exchanged_in_one_step(adapters, tmp_path, monkeypatch):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    inode = out.stat().st_ino
    real_rename = os.rename
    gaps = []

    def rename(src, dst, *args, **kwargs):  # every rename of the writer: is `out` there after it?
        real_rename(src, dst, *args, **kwargs)
        if not os.path.isdir(out):
            gaps.append((Path(src).name, Path(dst).name))

    monkeypatch.setattr(os, "rename", rename)
    merge_to_dir(adapters, out, MergeOptions(alpha=0.5), force=True)
    assert gaps == []
    assert out.stat().st_ino != inode and json.loads((out / "merge_report.json").read_text())["alpha"] == 0.5
    assert leftovers(out) == []


def test_without_renameat2_two_renames_still_replace_it(adapters, tmp_path, monkeypatch):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    monkeypatch.setattr(peft_io, "_renameat2", lambda: None)
    names = []
    real_rename = os.rename
    monkeypatch.setattr(os, "rename", lambda s, d: names.append(Path(d).name) or real_rename(s, d))
    merge_to_dir(adapters, out, MergeOptions(alpha=0.5), force=True)
    assert json.loads((out / "merge_report.json").read_text())["alpha"] == 0.5
    assert re.fullmatch(rf"\.merged\.old-{re.escape(HOST)}-{os.getpid()}-[a-z0-9_]+", names[0]), names
    assert leftovers(out) == []


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from coremerge import peft_io
    from coremerge.merge import MergeOptions, merge_to_dir

    def slow(f, chunks):  # the weights file is half written when the writer is killed
        f.write(next(iter(chunks)))
        f.flush()
        print("writing", flush=True)
        time.sleep(300)

    peft_io.write_hashed = slow
    merge_to_dir(sys.argv[1:3], sys.argv[3], MergeOptions(alpha=0.5), force=True)
""")


def test_a_writer_killed_mid_write_leaves_the_output_untouched_and_the_next_run_cleans_up(adapters, tmp_path):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    before = digest(out)
    writer = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, *map(str, adapters), str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.kill()  # SIGKILL: no cleanup runs
        writer.wait()
    assert digest(out) == before
    [left] = leftovers(out)
    assert left.startswith(f".merged.tmp-{HOST}-{writer.pid}-")
    assert (out.parent / left / "adapter_model.safetensors").stat().st_size > 0  # half a weights file

    reference = merge_to_dir(adapters, tmp_path / "reference", MergeOptions(alpha=0.5))
    proc = subprocess.run([sys.executable, "-m", "coremerge", "merge", *map(str, adapters), "--alpha", "0.5",
                           "--out", str(out), "--force"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert leftovers(out) == []
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes()


def test_leftovers_of_live_writers_and_other_hosts_are_kept(adapters, tmp_path):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    live = tmp_path / f".merged.tmp-{HOST}-{os.getpid()}-abc123"  # this process: alive
    other_host = tmp_path / f".merged.tmp-{HOST}x-{dead_pid()}-abc123"
    dead = tmp_path / f".merged.old-{HOST}-{dead_pid()}-zz"
    unknown = tmp_path / ".merged.tmp-abc123"  # an older writer's name: whose, nobody can tell
    for d in (live, other_host, dead, unknown):
        d.mkdir()
    assert peft_io.clean_dead_leftovers(out) == [dead]
    assert sorted(leftovers(out)) == sorted(p.name for p in (live, other_host, unknown))


def test_a_backup_whose_writer_died_between_two_renames_is_put_back(adapters, tmp_path):
    out = merge_to_dir(adapters, tmp_path / "merged", MergeOptions())
    before = digest(out)
    backup = tmp_path / f".merged.old-{HOST}-{dead_pid()}-k3j4"
    os.rename(out, backup)  # killed right after moving the old adapter aside
    temp = tmp_path / f".merged.tmp-{HOST}-{dead_pid()}-k3j5"
    temp.mkdir()
    assert peft_io.clean_dead_leftovers(out) == [temp]
    assert digest(out) == before and leftovers(out) == []


def test_an_output_that_cannot_be_written_is_found_before_the_merge(adapters, tmp_path, monkeypatch):
    merged = []
    real = merge_mod.merge_module_of
    monkeypatch.setattr(merge_mod, "merge_module_of", lambda *a, **k: merged.append(a[1]) or real(*a, **k))
    (tmp_path / "file").write_text("x")
    for out, expected in [(tmp_path / "file" / "merged", "is a file, not a directory"),
                          (tmp_path / "file", "exists and is not a directory")]:
        with pytest.raises(OutputPathError, match=expected):
            merge_to_dir(adapters, out, MergeOptions(), force=True)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "ro"))

    monkeypatch.setattr("tempfile.mkdtemp", denied)  # what a read-only or foreign directory answers
    with pytest.raises(OutputPathError, match="cannot write output .*Permission denied"):
        merge_to_dir(adapters, tmp_path / "ro" / "merged", MergeOptions())
    assert merged == []  # nothing was computed


def _as_a_user(command: list[str]) -> list[str]:
    """``command`` as root without the capabilities that let root write anywhere (or as is, not root)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("root writes a read-only directory anyway; setpriv is needed to drop that")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search",
            "--", *command]


def test_a_read_only_directory_is_refused_before_the_merge(adapters, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        proc = subprocess.run(_as_a_user([sys.executable, "-m", "coremerge", "merge", *map(str, adapters), "--out",
                                          str(ro / "merged")]), capture_output=True, text=True, timeout=120)
    finally:
        ro.chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"coremerge: error: cannot write output {ro}/merged: {ro}: Permission denied; "
                                   f"choose a directory you can write")
    assert list(ro.iterdir()) == []
