"""Iso-C and Iso-CTS against literal numpy float64 implementations (the reference algorithm),
plus the flat-spectrum and equivariance properties; iso_c_literal against the Core Space paper's
code, and where it puts the energy of a low-rank sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import iso

import reference_code  # tests/methods/reference_code.py: the Core Space paper's code, re-read


def literal_polar(x: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def literal_iso_c(tasks: np.ndarray, alpha: float) -> np.ndarray:
    total = tasks.sum(axis=0)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    tol = s.max() * max(total.shape) * np.finfo(np.float64).eps
    nonzero = s > tol
    flat = np.where(nonzero, s[nonzero].mean() if nonzero.any() else 0.0, 0.0)
    return alpha * u @ np.diag(flat) @ vh


def literal_iso_cts(tasks: np.ndarray, alpha: float, common_fraction: float) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    d = min(p, q)
    c = int(d * common_fraction)
    s_task = round((d - c) / num_tasks)
    if s_task * num_tasks > d:
        s_task = d // num_tasks
    c = d - s_task * num_tasks
    u, s, vh = np.linalg.svd(tasks.sum(axis=0), full_matrices=False)
    u_c, s_c, vh_c = u[:, :c], s[:c], vh[:c]
    us, ss, vhs = [], [], []
    for t in range(num_tasks):
        residual = tasks[t] - u_c @ u_c.T @ tasks[t]
        u_r, s_r, vh_r = np.linalg.svd(residual, full_matrices=False)
        us.append(u_r[:, :s_task])
        ss.append(s_r[:s_task])
        vhs.append(vh_r[:s_task])
    u_all = literal_polar(np.concatenate(us + [u_c], axis=1))
    vh_all = literal_polar(np.concatenate(vhs + [vh_c], axis=0))
    s_all = np.concatenate(ss + [s_c])
    return alpha * u_all @ (np.eye(d) * s_all.mean()) @ vh_all


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 6, 4), (1, 4, 4)])
def test_iso_c_matches_literal(random_tasks, shape):
    x = random_tasks(*shape)
    expected = torch.from_numpy(literal_iso_c(x.numpy(), 0.6))
    torch.testing.assert_close(iso.merge_c(x, alpha=0.6), expected, rtol=1e-10, atol=1e-10)


def test_iso_c_of_one_task_is_its_isotropic_version(random_tasks):
    x = random_tasks(num_tasks=1)
    u, s, vh = torch.linalg.svd(x[0], full_matrices=False)
    torch.testing.assert_close(iso.merge_c(x, alpha=2.0), 2.0 * s.mean() * (u @ vh), rtol=1e-12, atol=1e-12)


def test_iso_c_spectrum_is_flat_on_the_nonzero_part_only():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.outer(torch.randn(6, generator=g, dtype=torch.float64),
                                 torch.randn(6, generator=g, dtype=torch.float64)) for _ in range(2)])  # rank-1 tasks
    s_in = torch.linalg.svdvals(x.sum(0))
    s_out = torch.linalg.svdvals(iso.merge_c(x))
    torch.testing.assert_close(s_out[:2], s_in[:2].mean().expand(2), rtol=1e-12, atol=1e-12)
    assert float(s_out[2:].max()) < 1e-12


def test_iso_c_of_zeros_is_zeros():
    out = iso.merge_c(torch.zeros(2, 3, 4, dtype=torch.float64))
    assert out.shape == (3, 4) and not out.any()


@pytest.mark.parametrize(("d", "num_tasks", "fraction", "expected"), [
    (5, 3, 0.8, (5, 0)),     # round(1 / 3) = 0: the whole spectrum is common
    (8, 3, 0.5, (5, 1)),     # c = 4, s = round(4 / 3) = 1, c = 8 - 3
    (16, 6, 0.8, (10, 1)),   # c = 12, s = round(4 / 6) = 1, c = 16 - 6
    (8, 3, 0.0, (2, 2)),     # round(8 / 3) = 3 would need 9 > 8: s = 8 // 3
    (3, 2, 0.0, (1, 1)),     # round(1.5) = 2 would need 4 > 3
    (6, 2, 1.0, (6, 0)),
])
def test_iso_cts_split_sizes(d, num_tasks, fraction, expected):
    assert iso.split_sizes(d, num_tasks, fraction) == expected


@pytest.mark.parametrize(("shape", "fraction"), [((3, 8, 10), 0.5), ((3, 8, 10), 0.0), ((3, 5, 7), 0.8),
                                                  ((2, 9, 6), 0.8), ((4, 7, 7), 0.3)])
def test_iso_cts_matches_literal(random_tasks, shape, fraction):
    x = random_tasks(*shape, seed=7)
    expected = torch.from_numpy(literal_iso_cts(x.numpy(), 0.8, fraction))
    torch.testing.assert_close(iso.merge_cts(x, alpha=0.8, common_fraction=fraction), expected, rtol=1e-9, atol=1e-9)


def test_iso_cts_spectrum_is_flat(random_tasks):
    x = random_tasks(3, 8, 10)
    out = iso.merge_cts(x, common_fraction=0.5)
    s = torch.linalg.svdvals(out)
    torch.testing.assert_close(s, s.mean().expand(8), rtol=1e-10, atol=1e-10)


def test_iso_cts_all_common_is_iso_c_for_a_full_rank_sum(random_tasks):
    x = random_tasks()
    torch.testing.assert_close(iso.merge_cts(x, common_fraction=1.0), iso.merge_c(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [iso.merge_c, iso.merge_cts])
def test_rotations_commute(random_tasks, orthogonal, fn):
    x = random_tasks(3, 8, 10)
    left, right = orthogonal(8, 3), orthogonal(10, 4)
    torch.testing.assert_close(fn(left @ x @ right), left @ fn(x) @ right, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [iso.merge_c, iso.merge_cts])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_does_not_mutate(random_tasks, fn, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    assert fn(x).dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("fraction", [-0.1, 1.1, True, float("inf")])
def test_iso_cts_rejects_bad_common_fraction(random_tasks, fraction):
    with pytest.raises(ValueError, match="common_fraction"):
        iso.merge_cts(random_tasks(), common_fraction=fraction)


def low_rank_tasks(num_tasks: int, r: int, m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g,
                                                                                        dtype=torch.float64)
                        for _ in range(num_tasks)])  # (T, m, n), each of rank r


@pytest.mark.parametrize("x", [low_rank_tasks(4, 2, 24, 20, 0), low_rank_tasks(3, 4, 12, 12, 1),
                               torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)],
                         ids=["rank-8 sum of 24x20", "rank-12 sum of 12x12 (full)", "full rank"])
def test_iso_c_literal_is_the_reference_codes(x):
    # isotropize_matrix of the same summed matrix (how the sum is added up changes the rounding
    # noise whose singular vectors fill the null space, so both get the very same sum)
    total = x.sum(0)
    torch.testing.assert_close(iso.merge_c_literal(x, alpha=0.6), 0.6 * reference_code.isotropize(total),
                               rtol=0, atol=1e-12)


def test_iso_c_literal_puts_most_of_a_low_rank_sums_energy_outside_it():
    # 4 tasks of rank 2 in 24 x 20: the sum has rank k = 8 of d = 20. iso_c flattens the 8 non-zero
    # singular values; iso_c_literal gives all 20 directions the same value, so (d - k) / d = 60% of
    # its energy lies outside the sum's row and column spaces. On a full-rank sum they agree.
    x = low_rank_tasks(4, 2, 24, 20, 0)
    u, s, vh = torch.linalg.svd(x.sum(0), full_matrices=False)
    u8, v8 = u[:, :8], vh[:8]
    literal = iso.merge_c_literal(x)
    inside = u8 @ (u8.T @ literal @ v8.T) @ v8
    assert abs(float(1 - inside.norm() ** 2 / literal.norm() ** 2) - 12 / 20) < 1e-10
    torch.testing.assert_close(inside, iso.merge_c(x) * (s.sum() / 20) / s[:8].mean(), rtol=0, atol=1e-10)
    full = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(iso.merge_c_literal(full), iso.merge_c(full), rtol=0, atol=1e-12)
