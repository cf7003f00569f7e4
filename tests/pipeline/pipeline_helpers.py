"""Helpers of the pipeline tests: tiny synthetic adapters, job files, marked processes."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

from coremerge.synthetic import ALL_LINEAR, llama_shapes, write_lora_adapter

TINY = dict(hidden=32, intermediate=48, layers=3, kv_dim=16)
def make_adapters(root: Path, *, layers: int = 3) -> list[Path]:
    """Three unlike adapters (ranks 4 and 6, one rsLoRA, one that also adapts the MLP)."""
    model = {**TINY, "layers": layers}
    attn = llama_shapes(**model)
    return [
        write_lora_adapter(root / "snli", attn, rank=4, lora_alpha=8, seed=1),
        write_lora_adapter(root / "mnli", attn, rank=6, lora_alpha=6, use_rslora=True, seed=2),
        write_lora_adapter(root / "rte", llama_shapes(**model, modules=ALL_LINEAR), rank=4, lora_alpha=4, seed=3),
    ]


def write_job(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds COREMERGE_TEST_RUN=<marker>: those a test started."""
    needle = f"COREMERGE_TEST_RUN={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def stop_marked(marker: str, *, grace: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, the processes a test started; returns those that needed SIGKILL."""
    for pid in marked_pids(marker):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    stubborn = marked_pids(marker)
    for pid in stubborn:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stubborn


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now (for a Ray head of a test's own)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def poison(adapter: Path, module: str) -> None:
    """Put a NaN into one tensor of an adapter: its header stays valid, its data is corrupt."""
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = f"base_model.model.{module}.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})


def reference_merge(spec, out: Path) -> Path:
    """What ``coremerge merge`` writes for a job's merge (the function the command calls)."""
    from coremerge.merge import merge_to_dir, parse_dtype

    return merge_to_dir(list(spec.adapters), out, spec.options, dtype=parse_dtype(spec.out_dtype))


def assert_same_adapter(got: Path, want: Path) -> None:
    """Identical tensor bytes and config; the same report but for timings."""
    import json

    assert (got / "adapter_model.safetensors").read_bytes() == (want / "adapter_model.safetensors").read_bytes()
    assert (got / "adapter_config.json").read_bytes() == (want / "adapter_config.json").read_bytes()
    reports = [json.loads((d / "merge_report.json").read_text()) for d in (got, want)]
    for report in reports:
        report.pop("timings_s")
    assert reports[0] == reports[1]


def max_relative_difference(got: Path, want: Path) -> float:
    """max over tensors of ||got - want|| / ||want|| (Frobenius), in float64."""
    from safetensors.torch import load_file

    a, b = load_file(got / "adapter_model.safetensors"), load_file(want / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)) for k in a)


def json_lines(text: str) -> list[dict]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]
