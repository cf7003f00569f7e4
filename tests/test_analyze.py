"""coremerge analyze: every figure against a dense computation on small shapes, and the command.

The dense side forms each ΔW_t = B_t A_t (and the merge's ΔW) in float64 and uses numpy and
scipy (SVD, principal angles) directly: nothing of coremerge's own linear algebra is reused.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from coremerge import analyze
from coremerge.spaces import CoreSpace, merge_module, module_generator
from coremerge.types import LoraFactors

peft = pytest.importorskip("peft")
pq = pytest.importorskip("pyarrow.parquet")

from peft_factories import peft_deltas, save_adapter  # noqa: E402


def _factors(ranks, m=14, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(a=torch.randn(r, n, generator=g, dtype=torch.float64),
                        b=torch.randn(m, r, generator=g, dtype=torch.float64)) for r in ranks]


def _specs(methods, num, **kwargs):
    return analyze.merge_specs(methods, num_adapters=num, compute_dtype=torch.float64, **kwargs)


def _rows(factors, merges, *, sar_energy=0.95, full=False, names=None):
    names = names or [f"t{i}" for i in range(len(factors))]
    weights = {m.label: list(m.options.weights) for m in merges}
    deltas = torch.stack([f.delta() for f in factors]) if full else None
    return analyze.analyze_module("model.layers.3.mlp.up_proj", CoreSpace.build(factors), names, merges, weights,
                                  sar_energy=sar_energy, deltas=deltas)


def _energy_rank(s, share):  # the definition, by a loop
    s = np.asarray(s, dtype=np.float64)
    total = float((s ** 2).sum())
    acc = 0.0
    for q, value in enumerate(s, 1):
        acc += value ** 2
        if acc >= share * total * (1 - 1e-12):
            return q
    return len(s)


def _svd(x):
    u, s, vh = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
    keep = s > s.max() * max(x.shape) * np.finfo(np.float64).eps if s.size and s.max() > 0 else np.zeros(0, bool)
    return u[:, keep], s[keep], vh[keep]


def _dense_sar(merged, task, share):
    u, s, _ = _svd(merged)
    top = u[:, :_energy_rank(s, share)]
    return np.linalg.norm(top.T @ task) / np.linalg.norm(task)


# ----------------------------------------------------------------------------- figures vs dense


@pytest.mark.parametrize("method", ["ta", "ties", "tsv", "iso_c", "dare"])
def test_every_figure_matches_a_dense_computation(method):
    factors = _factors([2, 3, 5])  # heterogeneous ranks: k = 10
    merges = _specs([method], 3, alpha=0.7, weights=[1.0, 0.5, 2.0])
    rows = _rows(factors, merges)
    deltas = [f.delta().numpy() for f in factors]
    # the merge in core space, as coremerge merge writes it, made dense
    merged = merge_module(factors, method=method, space="core", weights=[1.0, 0.5, 2.0], alpha=0.7,
                          params=merges[0].options.params,
                          generator=module_generator(0, "model.layers.3.mlp.up_proj")
                          if method == "dare" else None).delta().numpy()
    _, s_merged, _ = _svd(merged)
    assert len(rows) == 3
    for t, row in enumerate(rows):
        assert (row["layer"], row["kind"], row["k"]) == (3, "mlp.up_proj", 10)
        assert row["task_rank"] == factors[t].rank
        s_task = np.linalg.svd(deltas[t], compute_uv=False)[:factors[t].rank]
        np.testing.assert_allclose(row["task_sv"], s_task, rtol=1e-10)
        assert row["task_norm"] == pytest.approx(np.linalg.norm(deltas[t]), rel=1e-12)
        for share in analyze.ENERGY_SHARES:
            assert row[f"task_rank_{round(share * 100)}"] == _energy_rank(s_task, share)
            assert row[f"merged_rank_{round(share * 100)}"] == _energy_rank(s_merged, share)
        np.testing.assert_allclose(row["merged_sv"], s_merged, rtol=1e-9, atol=1e-12 * s_merged[0])
        assert row["merged_rank"] == len(s_merged)
        assert row["sar"] == pytest.approx(_dense_sar(merged, deltas[t], 0.95), rel=1e-9)
        # the other tasks: cosine of the updates, principal angles of their column spaces (scipy)
        others = [i for i in range(3) if i != t]
        assert row["other_tasks"] == [f"t{i}" for i in others]
        for i, cos, sub in zip(others, row["cosine"], row["subspace_overlap"]):
            want = float((deltas[t] * deltas[i]).sum() / (np.linalg.norm(deltas[t]) * np.linalg.norm(deltas[i])))
            assert cos == pytest.approx(want, rel=1e-10, abs=1e-12)
            angles = scipy.linalg.subspace_angles(deltas[t], deltas[i])  # min(r_s, r_t) principal angles
            assert sub == pytest.approx(float(np.mean(np.cos(angles) ** 2)), rel=1e-8)
        # truncation: the relative error of the best rank-q approximation, q = 1..k
        u, s, vh = np.linalg.svd(merged, full_matrices=False)
        want = [np.linalg.norm(merged - (u[:, :q] * s[:q]) @ vh[:q]) / np.linalg.norm(merged) for q in range(1, 11)]
        np.testing.assert_allclose(row["truncation_error"], want, atol=1e-9)


def test_full_space_figures_match_the_dense_full_space_merge():
    factors = _factors([3, 4, 4], m=9, n=13, seed=4)
    merges = _specs(["ties", "ta"], 3, params={"density": 0.4})
    rows = _rows(factors, merges, full=True)
    deltas = [f.delta().numpy() for f in factors]
    for merge in merges:
        dense = merge_module(factors, method=merge.options.method, space="full",
                             params=merge.options.params).delta().numpy()
        _, s, _ = _svd(dense)
        for t, row in enumerate(r for r in rows if r["merge"] == merge.label):
            assert row["sar_full"] == pytest.approx(_dense_sar(dense, deltas[t], 0.95), rel=1e-8)
            np.testing.assert_allclose(row["full_merged_sv"], s, rtol=1e-8, atol=1e-10 * s[0])
            assert row["full_merged_rank_99"] == _energy_rank(s, 0.99)
    # task arithmetic is linear: the same merge in both spaces, so the same alignment
    ta = [r for r in rows if r["merge"] == "ta"]
    assert all(r["sar"] == pytest.approx(r["sar_full"], rel=1e-9) for r in ta)


def test_a_task_merged_alone_is_fully_aligned():
    (single,) = _factors([6], seed=2)
    delta = single.delta().numpy()
    for method in ("ta", "tsv", "iso_c"):
        (row,) = _rows([single], _specs([method], 1), sar_energy=1.0)
        assert row["sar"] == pytest.approx(1.0, abs=1e-12)
    # under a threshold, SAR is the share of its norm that its own top k_M directions hold
    (row,) = _rows([single], _specs(["ta"], 1), sar_energy=0.9)
    s = np.linalg.svd(delta, compute_uv=False)
    k_m = _energy_rank(s[:6], 0.9)
    assert row["sar_k"] == k_m
    assert row["sar"] == pytest.approx(math.sqrt((s[:k_m] ** 2).sum() / (s ** 2).sum()), rel=1e-12)
    assert row["sar"] >= math.sqrt(0.9)


def test_truncation_error_is_what_merge_rank_writes_and_zero_at_k():
    factors = _factors([4, 4, 2], seed=7)
    (merge,) = _specs(["tsv"], 3)
    rows = _rows(factors, [merge])
    errors = rows[0]["truncation_error"]
    assert len(errors) == 10 and errors[-1] == 0.0
    assert all(a >= b for a, b in zip(errors, errors[1:]))  # more rank never costs more
    whole = merge_module(factors, method="tsv").delta()
    for q in (1, 3, 6, 10):
        cut = merge_module(factors, method="tsv", rank=q).delta()  # coremerge merge --rank q
        assert float((whole - cut).norm() / whole.norm()) == pytest.approx(errors[q - 1], abs=1e-9)


def test_energy_rank_and_truncation_of_edge_spectra():
    assert analyze.energy_rank(torch.zeros(3), 0.9) == 0
    assert analyze.energy_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.75) == 3  # exactly at the share
    assert analyze.energy_rank(torch.tensor([1.0, 0.0]), 1.0) == 1
    assert analyze.truncation_errors(torch.zeros(2), 3) == [0.0, 0.0, 0.0]
    assert analyze.truncation_errors(torch.tensor([2.0]), 2) == [0.0, 0.0]


def test_an_all_zero_module_has_no_directions_and_nothing_to_lose():
    zero = [LoraFactors(a=torch.randn(2, 5, dtype=torch.float64), b=torch.zeros(6, 2, dtype=torch.float64))] * 2
    rows = _rows(zero, _specs(["ta"], 2))
    assert all(r["merged_rank"] == 0 and r["sar_k"] == 0 and math.isnan(r["sar"]) for r in rows)
    assert all(set(r["truncation_error"]) == {0.0} for r in rows)


def test_parameters_go_to_the_methods_that_take_them():
    specs = analyze.merge_specs(["ta", "ties", "cart"], num_adapters=2, params={"density": 0.3})
    assert [dict(s.options.params).get("density") for s in specs] == [None, 0.3, 0.3]
    with pytest.raises(ValueError, match="lam.*none of the methods ta, tsv"):
        analyze.merge_specs(["ta", "tsv"], num_adapters=2, params={"lam": 1.0})
    with pytest.raises(ValueError, match="'ta' is given more than once"):
        analyze.merge_specs(["ta", "ta"], num_adapters=2)


# ----------------------------------------------------------------------------- real adapters, the command


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return [
        save_adapter(root, "snli", lora, seed=1),
        save_adapter(root, "mnli", peft.LoraConfig(r=8, lora_alpha=8, use_rslora=True,
                                                   target_modules=["q_proj", "v_proj"]), seed=2),
        save_adapter(root, "vera", peft.VeraConfig(r=6, target_modules=["q_proj", "v_proj"], save_projection=True),
                     seed=3),
    ]


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "coremerge", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


class _Done:
    def __init__(self, returncode, out, err):
        self.returncode, self.stdout, self.stderr = returncode, out, err


def _main(capsys, *args):
    """The command in this process (the first test runs it as its own process)."""
    from coremerge import cli

    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return _Done(code, captured.out, captured.err)


def test_the_command_analyses_heterogeneous_lora_and_vera_adapters(adapters, tmp_path):
    out = tmp_path / "report"
    done = _cli("analyze", *adapters, "--method", "ta,tsv", "--method", "ties", "--full", "--out", out, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [m["merge"] for m in summary["methods"]] == ["ta", "tsv", "ties"]
    assert summary == json.loads((out / analyze.JSON_NAME).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([analyze.JSON_NAME, analyze.SUMMARY_NAME,
                                                            analyze.TABLE_NAME, *analyze.PLOTS])
    for plot in analyze.PLOTS:
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = pq.read_table(out / analyze.TABLE_NAME).to_pylist()
    # q_proj and v_proj in all three adapters (2 layers), up_proj only in snli: one row per module, merge, task
    assert len(rows) == 3 * (2 * 2 * 3 + 2 * 1)
    deltas = {name: peft_deltas(path) for name, path in zip(("snli", "mnli", "vera"), adapters)}
    for row in rows:
        # each task's spectrum is that of PEFT's own delta weight of the module (an external check)
        module = row["module"].removeprefix("base_model.model.")
        s = torch.linalg.svdvals(deltas[row["task"]][module].double())[:row["task_rank"]]
        np.testing.assert_allclose(row["task_sv"], s.numpy(), rtol=2e-4, atol=1e-6 * float(s[0]))
        assert row["task_rank"] == {"snli": 4, "mnli": 8, "vera": 6}[row["task"]]
        assert row["k"] == (18 if row["kind"] != "mlp.up_proj" else 4)
        assert 0.0 <= row["sar"] <= 1.0 + 1e-6 and 0.0 <= row["sar_full"] <= 1.0 + 1e-6
        if row["kind"] == "mlp.up_proj":  # one adapter: aligned with itself, nothing else to compare
            assert row["other_tasks"] == [] and row["sar"] >= math.sqrt(0.95) - 1e-6
    assert summary["methods"][0]["mean_sar"]["core"] == pytest.approx(np.mean([r["sar"] for r in rows
                                                                               if r["merge"] == "ta"]))
    text = (out / analyze.SUMMARY_NAME).read_text()
    assert "| ta | 1 |" in text and "vera" in text


def test_the_report_is_written_whole_and_never_over_what_it_did_not_write(adapters, tmp_path, capsys):
    out = tmp_path / "report"
    assert _main(capsys, "analyze", *adapters[:2], "--method", "ta", "--out", out).returncode == 0
    first = (out / analyze.JSON_NAME).read_text()
    again = _main(capsys, "analyze", *adapters[:2], "--method", "ta", "--out", out)
    assert again.returncode == 2 and "pass --force" in again.stderr and again.stderr.count("\n") == 1
    assert _main(capsys, "analyze", *adapters[:2], "--method", "tsv", "--out", out, "--force").returncode == 0
    assert (out / analyze.JSON_NAME).read_text() != first
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    refused = _main(capsys, "analyze", *adapters[:2], "--out", other, "--force")
    assert refused.returncode == 2 and (other / "keep.txt").read_text() == "mine"
    inside = _main(capsys, "analyze", *adapters[:2], "--out", adapters[0] / "report", "--force")
    assert inside.returncode == 2 and "inside adapter" in inside.stderr
    assert sorted(p.name for p in adapters[0].iterdir()) == ["README.md", "adapter_config.json",
                                                              "adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp directory left


def test_a_failure_while_writing_leaves_no_report(adapters, tmp_path, monkeypatch):
    result = analyze.analyze(adapters[:2], analyze.merge_specs(["ta"], num_adapters=2))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(analyze, "write_plots", broken)
    with pytest.raises(OSError):
        analyze.write_report(result, tmp_path / "report", inputs=adapters[:2])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["--method", "nope", "--json"], "unknown merge method 'nope'"),
    (["--method", "ta", "-p", "lam=2", "--json"], "taken by none of the methods"),
    (["--sar-energy", "0", "--json"], "--sar-energy must be a share in (0, 1]"),
    ([], "give --out DIR"),
])
def test_bad_options_are_one_line_and_exit_2(adapters, args, message, capsys):
    done = _main(capsys, "analyze", *adapters[:2], *args)
    assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1
    assert done.stdout == ""
