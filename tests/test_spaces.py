"""The facts of PAPER.md about core space, each as a test.

Every expected value is computed independently of coremerge's core-space code: from the
dense updates B_t A_t, in float64.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from coremerge import methods
from coremerge.basis import reference_basis
from coremerge.linalg import factor_dense
from coremerge.project import project
from coremerge.reconstruct import to_lowrank
from coremerge.spaces import CoreSpace, merge_module, module_generator
from coremerge.types import FactoredLowRank, LoraFactors, LowRank

F64 = torch.float64


def random_factors(shapes_ranks, *, m=24, n=20, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(a=torch.randn(r, n, generator=g, dtype=dtype), b=torch.randn(m, r, generator=g, dtype=dtype))
            for r in shapes_ranks]


def dense(fs):
    return torch.stack([f.b @ f.a for f in fs])  # (T, m, n)


def test_lossless_projection():
    fs = random_factors([3, 5, 4])
    basis = reference_basis(fs)
    cores = project(fs, basis)
    for f, core in zip(fs, cores):
        torch.testing.assert_close(basis.u @ core @ basis.v, f.b @ f.a, rtol=0, atol=1e-12)


def test_bases_are_orthonormal_and_untruncated():
    fs = random_factors([3, 5, 4])
    basis = reference_basis(fs)
    assert basis.core_shape == (12, 12)  # k = 12 <= min(24, 20): nothing dropped
    torch.testing.assert_close(basis.u.T @ basis.u, torch.eye(12, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(basis.v @ basis.v.T, torch.eye(12, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
def test_task_arithmetic_is_the_exact_weighted_sum(space):
    fs = random_factors([2, 6, 3])
    weights = [1.0, 0.5, -2.0]
    merged = merge_module(fs, method="ta", space=space, weights=weights, alpha=0.7)
    expected = 0.7 * sum(w * f.b @ f.a for w, f in zip(weights, fs))
    torch.testing.assert_close(merged.delta(), expected, rtol=0, atol=1e-11)


def test_core_ta_rank_is_summed_rank():
    fs = random_factors([2, 6, 3])
    merged = merge_module(fs, method="ta", space="core")
    assert merged.rank == 11 and merged.b.shape == (24, 11) and merged.a.shape == (11, 20)


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_one_adapter_merges_to_itself_for_linear_and_spectral_identities(method):
    # With one adapter: ta, ties(density 1), dare(density 1), tsv and cart return it unchanged.
    fs = random_factors([4])
    params = {"density": 1.0} if "density" in methods.METHODS[method].hyperparams else {}
    if method.startswith("iso"):
        pytest.skip("iso methods flatten the spectrum by design; covered by test_iso_c_core_equals_full")
    merged = merge_module(fs, method=method, space="core", params=params, generator=module_generator(0, "m"))
    torch.testing.assert_close(merged.delta(), fs[0].b @ fs[0].a, rtol=0, atol=1e-10)


def test_inputs_and_cached_cores_are_never_mutated():
    fs = random_factors([3, 3, 2])
    before = [(f.a.clone(), f.b.clone()) for f in fs]
    space = CoreSpace.build(fs)
    cores = space.cores.clone()
    for method in methods.METHODS:
        for _ in range(2):
            space.merge(method, weights=[1.0, 2.0, 0.5], generator=module_generator(1, "x"))
    torch.testing.assert_close(space.cores, cores, rtol=0, atol=0)
    for f, (a, b) in zip(fs, before):
        assert torch.equal(f.a, a) and torch.equal(f.b, b)


@pytest.mark.parametrize("method", list(methods.METHODS))
@pytest.mark.parametrize("rank", [None, 4])
def test_a_core_merged_once_serves_every_alpha_bit_for_bit(method, rank):
    # What a sweep over alpha does: merge_core once, lowrank at each alpha; the same bits as merge.
    fs = random_factors([3, 5, 2], dtype=torch.float32)
    space = CoreSpace.build(fs)
    core = space.merge_core(method, weights=[1.0, 0.5, 2.0], generator=module_generator(4, "m"))
    for alpha in (0.3, 1.0, 1.7):
        want = space.merge(method, weights=[1.0, 0.5, 2.0], alpha=alpha, generator=module_generator(4, "m"),
                           rank=rank)
        got = space.lowrank(core, alpha=alpha, rank=rank)
        assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b) and got.energy_kept == want.energy_kept
    zero = CoreSpace.build([LoraFactors(a=torch.randn(2, 20), b=torch.zeros(24, 2))])
    assert zero.merge_core(method, weights=[1.0], generator=module_generator(4, "m")) is None
    assert torch.count_nonzero(zero.lowrank(None, alpha=0.5).delta()) == 0
    with pytest.raises(ValueError, match="alpha"):
        space.lowrank(core, alpha=float("nan"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rank", [None, 4])
def test_factored_result_stored_and_reloaded_expands_to_lowrank_bit_for_bit(dtype, rank):
    # What a pipeline sweep does: keep U and V once, each merge's small x (and y), through a
    # safetensors file, and expand at assembly: the same bits as lowrank.
    from safetensors.torch import load, save

    space = CoreSpace.build(random_factors([3, 5, 2], dtype=dtype))
    assert space.basis.u.is_contiguous() and space.basis.v.is_contiguous()
    core = space.merge_core("tsv", weights=[1.0, 0.5, 2.0])
    factored = space.factored(core, alpha=0.7, rank=rank)
    assert isinstance(factored, FactoredLowRank) and (factored.y is None) == (rank is None)
    stored = {"u": factored.u, "v": factored.v, "x": factored.x.contiguous()}
    if factored.y is not None:
        stored["y"] = factored.y.contiguous()
    back = load(save(stored))
    again = FactoredLowRank(u=back["u"], x=back["x"], y=back.get("y"), v=back["v"], energy_kept=factored.energy_kept)
    want = space.lowrank(core, alpha=0.7, rank=rank)
    got = again.expand()
    assert torch.equal(got.a, want.a) and torch.equal(got.b, want.b) and got.energy_kept == want.energy_kept
    assert factored.rank == want.rank and (factored.out_features, factored.in_features) == tuple(want.delta().shape)
    assert isinstance(space.factored(None, alpha=0.7, rank=rank), LowRank)  # a zero module stays LowRank


def test_dare_repeated_merges_do_not_compound():
    # The published code rescales cached cores in place, so a second merge differs; ours must not.
    fs = random_factors([3, 3])
    space = CoreSpace.build(fs)
    first = space.merge("dare", weights=[1, 1], params={"density": 0.5}, generator=module_generator(3, "q"))
    second = space.merge("dare", weights=[1, 1], params={"density": 0.5}, generator=module_generator(3, "q"))
    torch.testing.assert_close(first.delta(), second.delta(), rtol=0, atol=0)


def test_mixed_ranks_and_k_above_min_dimension():
    # k = 8 + 8 + 8 = 24 > min(m, n) = 10: bases are capped at the dimension, still lossless.
    fs = random_factors([8, 8, 8], m=16, n=10)
    basis = reference_basis(fs)
    assert basis.core_shape == (16, 10)
    for f, core in zip(fs, project(fs, basis)):
        torch.testing.assert_close(basis.u @ core @ basis.v, f.b @ f.a, rtol=0, atol=1e-11)
    merged = merge_module(fs, method="ta", space="core", alpha=1.0)
    torch.testing.assert_close(merged.delta(), dense(fs).sum(0), rtol=0, atol=1e-11)
    for method in methods.METHODS:  # every method runs on non-square cores and gives a finite update
        out = merge_module(fs, method=method, space="core", generator=module_generator(0, "m"))
        assert out.b.shape[0] == 16 and out.a.shape[1] == 10 and torch.isfinite(out.delta()).all()


def iso_c_full_space_reference(deltas, alpha):
    # Literal full-space Iso-C on the non-zero spectrum, float64, from the dense sum.
    total = deltas.sum(0)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    nonzero = s > s.max() * max(total.shape) * torch.finfo(F64).eps
    flat = torch.where(nonzero, s[nonzero].mean(), torch.zeros_like(s))
    return alpha * (u * flat) @ vh


def test_iso_c_core_equals_full_space_on_the_nonzero_spectrum():
    fs = random_factors([2, 3, 2])
    merged = merge_module(fs, method="iso_c", space="core", alpha=0.8)
    torch.testing.assert_close(merged.delta(), iso_c_full_space_reference(dense(fs), 0.8), rtol=0, atol=1e-10)
    full = merge_module(fs, method="iso_c", space="full", alpha=0.8)
    torch.testing.assert_close(full.delta(), merged.delta(), rtol=0, atol=1e-10)


def test_degenerate_inputs_duplicates_and_zero_b():
    fs = random_factors([3, 2])
    zero_b = LoraFactors(a=torch.randn(4, 20, dtype=F64), b=torch.zeros(24, 4, dtype=F64))
    dup = fs + [LoraFactors(a=fs[0].a.clone(), b=fs[0].b.clone()), zero_b]
    basis = reference_basis(dup)
    assert basis.u.shape[1] == 5  # the duplicate and the zero B add no column directions
    assert basis.v.shape[0] == 9  # the zero-B adapter's A still spans rows: 3 + 2 + 4
    merged = merge_module(dup, method="iso_c", space="core", alpha=1.0)
    torch.testing.assert_close(merged.delta(), iso_c_full_space_reference(dense(dup), 1.0), rtol=0, atol=1e-10)


def test_all_zero_module_gives_a_rank_one_zero_update():
    zero = [LoraFactors(a=torch.zeros(2, 20, dtype=F64), b=torch.zeros(24, 2, dtype=F64))]
    merged = merge_module(zero, method="tsv", space="core")
    assert merged.rank == 1 and not merged.delta().any()


def test_tsv_keeps_each_adapters_rank_in_core_space():
    # Tasks with orthogonal supports: TSV keeps r_t components of each, so it reproduces the sum.
    m = n = 24
    eye = torch.eye(m, dtype=F64)
    fs = [LoraFactors(a=eye[0:3] * 2.0, b=eye[:, 0:3]), LoraFactors(a=eye[3:8], b=eye[:, 3:8] * 3.0)]
    merged = merge_module(fs, method="tsv", space="core", alpha=1.0)
    torch.testing.assert_close(merged.delta(), dense(fs).sum(0), rtol=0, atol=1e-12)
    assert merged.rank == 8


def test_tsv_core_equals_full_when_every_rank_fits_its_share():
    # Full-space TSV keeps min(m, n) // T = 20 // 3 = 6 components of each task, capped at its non-zero
    # spectrum: ranks 3, 5, 4 fit, so it keeps what core space keeps (r_t each), in the same spaces.
    fs = random_factors([3, 5, 4])
    core = merge_module(fs, method="tsv", space="core", alpha=0.9)
    full = merge_module(fs, method="tsv", space="full", alpha=0.9)
    torch.testing.assert_close(core.delta(), full.delta(), rtol=0, atol=1e-10)


def test_sign_flips_of_the_basis_change_nothing():
    fs = random_factors([3, 4, 2])
    basis = reference_basis(fs)
    flip_u = torch.where(torch.arange(basis.u.shape[1]) % 2 == 0, 1.0, -1.0).to(F64)
    flip_v = torch.where(torch.arange(basis.v.shape[0]) % 3 == 0, -1.0, 1.0).to(F64)
    flipped = type(basis)(u=basis.u * flip_u, v=basis.v * flip_v[:, None])
    for method in ["ties", "dare_ties", "tsv", "iso_c", "iso_cts", "cart"]:
        g1, g2 = module_generator(5, "m"), module_generator(5, "m")
        ref = to_lowrank(basis, methods.apply(method, project(fs, basis), generator=g1)).delta()
        out = to_lowrank(flipped, methods.apply(method, project(fs, flipped), generator=g2)).delta()
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10, msg=method)


def test_the_basis_matters_for_ties_but_not_for_ta():
    fs = random_factors([3, 4, 2])
    basis = reference_basis(fs)
    g = torch.Generator().manual_seed(0)
    q_u, _ = torch.linalg.qr(torch.randn(basis.u.shape[1], basis.u.shape[1], generator=g, dtype=F64))
    q_v, _ = torch.linalg.qr(torch.randn(basis.v.shape[0], basis.v.shape[0], generator=g, dtype=F64))
    rotated = type(basis)(u=basis.u @ q_u, v=q_v.T @ basis.v)  # another orthonormal basis of the same spaces

    def merged(b, method):
        return to_lowrank(b, methods.apply(method, project(fs, b), params={"density": 0.5} if method == "ties" else None)).delta()

    torch.testing.assert_close(merged(rotated, "ta"), merged(basis, "ta"), rtol=0, atol=1e-10)
    assert (merged(rotated, "ties") - merged(basis, "ties")).abs().max() > 1e-3


def test_truncation_is_the_best_rank_q_approximation():
    fs = random_factors([4, 4, 4])
    full = merge_module(fs, method="ta", space="core")
    cut = merge_module(fs, method="ta", space="core", rank=5)
    assert cut.rank == 5
    u, s, vh = torch.linalg.svd(full.delta())  # Eckart–Young, computed on the dense update
    best = (u[:, :5] * s[:5]) @ vh[:5]
    torch.testing.assert_close(cut.delta(), best, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.tensor(cut.energy_kept, dtype=F64), (s[:5] ** 2).sum() / (s ** 2).sum())


@pytest.mark.parametrize("space", ["full", "knots"])
def test_truncation_in_baseline_spaces(space):
    fs = random_factors([4, 4])
    cut = merge_module(fs, method="ta", space=space, rank=3)
    u, s, vh = torch.linalg.svd(dense(fs).sum(0))
    torch.testing.assert_close(cut.delta(), (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-10)


@pytest.mark.parametrize("space", ["core", "full", "knots"])
@pytest.mark.parametrize("rank", [None, 5])
def test_written_spectrum_is_the_dense_updates(space, rank):
    # What the oversize report reads (coremerge.merge.oversized_factors): the singular values of the
    # written update, from the factors each space writes, against a dense SVD.
    from coremerge.spaces import written_spectrum

    fs = random_factors([3, 5, 4])
    for method in ("ta", "ties", "tsv", "iso_cts"):
        merged = merge_module(fs, method=method, space=space, rank=rank)
        s = written_spectrum(merged, space=space, truncated=rank is not None)
        want = torch.linalg.svdvals(merged.delta())  # (min(m, n),)
        assert s.shape == (merged.rank,)
        torch.testing.assert_close(s, want[:merged.rank], rtol=0, atol=1e-12 * float(want[0]), msg=method)
        assert not want[merged.rank:].any() or float(want[merged.rank:].max()) < 1e-10 * float(want[0])


def test_weights_scale_the_tasks_before_ties_and_its_mean_divides_by_the_count():
    # coremerge's rule (PAPER.md): w_t multiplies task t before the method; TIES' disjoint mean then
    # divides by the number of agreeing entries. mergekit's TIES divides by the sum of their weights
    # (a weighted mean): both computed here from the dense updates, in float64.
    fs = random_factors([3, 3, 3, 3])
    w = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=F64)
    flat = dense(fs).reshape(4, -1)  # (T, m n)
    k = int(0.7 * flat.shape[1]) + 1
    kept = flat.abs() >= flat.abs().sort(dim=1, descending=True).values[:, k - 1:k]  # (T, m n): top k
    weighted = w[:, None] * flat
    elected_positive = (weighted * kept).sum(0) >= 0
    agree = kept & ((weighted > 0) == elected_positive)
    total = (weighted * agree).sum(0)  # (m n,)
    by_count = total / agree.sum(0).clamp(min=1)
    weight_sum = (w[:, None] * agree).sum(0)
    by_weight = total / torch.where(weight_sum == 0, 1.0, weight_sum)  # mergekit 0.1.x, normalize: true
    got = merge_module(fs, method="ties", space="full", weights=w.tolist(), params={"density": 0.7})
    torch.testing.assert_close(got.delta().reshape(-1), by_count, rtol=0, atol=1e-10)
    assert float((by_count - by_weight).norm() / by_weight.norm()) > 0.3  # README: the two rules differ a lot
    # weights scale the merge here (as for ta); under mergekit's rule 2 x every weight changes nothing
    twice = merge_module(fs, method="ties", space="full", weights=[2.0] * 4, params={"density": 0.7})
    once = merge_module(fs, method="ties", space="full", weights=[1.0] * 4, params={"density": 0.7})
    torch.testing.assert_close(twice.delta(), 2 * once.delta(), rtol=0, atol=1e-10)


def test_cart_differs_between_spaces_only_by_the_rank_its_fraction_gives():
    # CART is rotation-equivariant, so core-space and full-space CART differ only because density is
    # a fraction of min(p, q): k = 12 in core space, min(24, 20) = 20 in full space.
    fs = random_factors([3, 5, 4])
    core = merge_module(fs, method="cart", space="core", params={"density": 0.5})  # rank ceil(6.0) = 6
    full = merge_module(fs, method="cart", space="full", params={"density": 0.3})  # rank ceil(6.0) = 6
    torch.testing.assert_close(core.delta(), full.delta(), rtol=0, atol=1e-10)
    same_density = merge_module(fs, method="cart", space="full", params={"density": 0.5})  # rank 10
    assert float((same_density.delta() - core.delta()).norm() / core.delta().norm()) > 1e-3


def test_factor_dense_keeps_the_numerical_rank():
    fs = random_factors([3])
    out = factor_dense(fs[0].b @ fs[0].a, None)
    assert out.rank == 3


def test_float32_is_the_default_and_close_to_float64():
    fs64 = random_factors([8, 8, 16], m=64, n=48)
    fs32 = [LoraFactors(a=f.a.float(), b=f.b.float()) for f in fs64]
    for method in ["ta", "tsv", "iso_c"]:
        out32 = merge_module(fs32, method=method, space="core").delta()
        out64 = merge_module(fs64, method=method, space="core").delta()
        assert out32.dtype == torch.float32
        assert (out32.double() - out64).norm() / out64.norm() < 1e-5, method


def test_module_generator_is_stable_across_processes():
    code = ("from coremerge.spaces import module_generator; import torch;"
            "print(torch.rand(4, generator=module_generator(7, 'model.layers.0.q_proj')).tolist())")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    here = str(torch.rand(4, generator=module_generator(7, "model.layers.0.q_proj")).tolist())
    assert runs == {here + "\n"}
    other = torch.rand(4, generator=module_generator(7, "model.layers.1.q_proj"))
    assert not torch.equal(other, torch.rand(4, generator=module_generator(7, "model.layers.0.q_proj")))


def test_import_coremerge_pulls_in_neither_ray_nor_pyarrow():
    code = "import sys, coremerge, coremerge.cli; print(sorted(m for m in ('ray', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
