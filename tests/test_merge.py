"""Modules written as LoRA factors larger than their dense update: the figures merge_report.json
records (checked against dense SVDs of the written tensors) and the one warning line of
`coremerge merge`, on real PEFT adapters of a tiny Llama (q/o 32x32, k/v 16x32, 2 layers)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft_factories import save_adapter  # noqa: E402

from coremerge.merge import MergeOptions, merge_to_dir  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        save_adapter(root, "a", peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), seed=1),
        save_adapter(root, "b", peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS), seed=2),
        save_adapter(root, "c", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), seed=3),
    ]


def dense_figures(out: Path, share: float = 0.99) -> dict[str, object]:
    """The figures from the written adapter alone: each module's dense update b @ a (scale 1, as
    written), its byte counts from the tensors' shapes and dtype, its 99% rank from a dense SVD."""
    tensors = load_file(out / "adapter_model.safetensors")
    modules, factor_bytes, dense_bytes, rank = 0, 0, 0, 0
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        b = tensors[key.replace("lora_A", "lora_B")]
        (q, n), m, size = a.shape, b.shape[0], a.element_size()
        if q * (m + n) <= m * n:
            continue
        modules, factor_bytes, dense_bytes = modules + 1, factor_bytes + q * (m + n) * size, dense_bytes + m * n * size
        energies = [float(x) ** 2 for x in torch.linalg.svdvals(b.double() @ a.double())]
        kept, needed = 0.0, 0
        while kept < share * sum(energies) * (1 - 1e-12):
            kept, needed = kept + energies[needed], needed + 1
        rank = max(rank, needed)
    return {"modules": modules, "factor_bytes": factor_bytes, "dense_bytes": dense_bytes,
            "rank_for_99pct_energy": rank if modules else None}


@pytest.mark.parametrize(("space", "method", "rank", "oversized"), [
    ("full", "ties", None, 8),  # rank up to min(m, n): every module
    ("full", "ties", 20, 8),    # 20 (16 + 32) > 16 x 32 and 20 (32 + 32) > 32 x 32
    ("core", "ta", None, 4),    # k = 4 + 8 (+ 2) = 12 or 14 > 16 x 32 / 48 in k/v; not in q/o (> 14 needed)
    ("knots", "ties", None, 4),
    ("core", "tsv", 4, 0),
])
def test_report_figures_equal_dense_svds_of_the_written_factors(adapters, tmp_path, space, method, rank, oversized):
    out = merge_to_dir(adapters, tmp_path / "m", MergeOptions(method=method, space=space, rank=rank))
    report = json.loads((out / "merge_report.json").read_text())
    figures = report["factors_larger_than_dense"]
    assert figures == dense_figures(out)
    assert figures["modules"] == oversized


def test_one_warning_line_names_the_figures(adapters, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="coremerge.merge"):
        out = merge_to_dir(adapters, tmp_path / "full", MergeOptions(method="ties", space="full"))
    (record,) = caplog.records
    want = dense_figures(out)
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"8 of 8 merged modules are written as LoRA factors larger than their "
                                          f"dense update: ")
    assert f"--rank {want['rank_for_99pct_energy']} keeps 99% of the energy of each of them" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coremerge.merge"):
        merge_to_dir(adapters, tmp_path / "small", MergeOptions(method="ties", space="full", rank=4))
    assert caplog.records == []


def test_the_command_prints_it_once_on_stderr(adapters, tmp_path):
    exe = shutil.which("coremerge")
    cmd = [exe] if exe else [sys.executable, "-m", "coremerge"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*cmd, "merge", *map(str, adapters), "--method", "ties", "--space", "full",
                           "--dtype", "float32", "--out", str(tmp_path / "full")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    want = dense_figures(tmp_path / "full")
    # 8 modules: k/v 16x32 and q/o 32x32 at full rank, float32: (2 (16 * 48) + 2 (32 * 64)) * 4 * 2 layers
    assert want["factor_bytes"] == 2 * (2 * 16 * 48 + 2 * 32 * 64) * 4 == 45056
    assert want["dense_bytes"] == 2 * (2 * 16 * 32 + 2 * 32 * 32) * 4 == 24576
    assert "WARNING" in line and ("8 of 8 merged modules are written as LoRA factors larger than their dense "
                                  "update: 45.1 kB of factors where the dense updates take 24.6 kB; "
                                  f"--rank {want['rank_for_99pct_energy']} keeps 99% of the energy") in line
    core = subprocess.run([*cmd, "merge", *map(str, adapters), "--method", "ties", "--out", str(tmp_path / "core")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert core.returncode == 0 and len(core.stderr.strip().splitlines()) == 1  # core: k/v at k = 12 and 14
    assert "4 of 8 merged modules are written as LoRA factors larger" in core.stderr
    tiny = subprocess.run([*cmd, "merge", str(adapters[2]), "--out", str(tmp_path / "one")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert tiny.returncode == 0 and tiny.stderr == "", tiny.stderr  # rank 2 everywhere: nothing to say
