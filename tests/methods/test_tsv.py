"""TSV against a literal numpy float64 implementation, plus identities: one task with its
rank, tasks with orthogonal supports, rotation equivariance; tsv_literal against the Core Space
paper's code, and why it is not the default (its null-space directions are rounding noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import tsv

import reference_code  # tests/methods/reference_code.py: the Core Space paper's code, re-read


def literal_polar(x: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh


def literal_tsv(tasks: np.ndarray, alpha: float, task_ranks=None) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    d = min(p, q)
    us, ss, vs = [], [], []
    for t in range(num_tasks):
        c = min(task_ranks[t], d) if task_ranks is not None else max(1, d // num_tasks)
        u, s, vh = np.linalg.svd(tasks[t], full_matrices=False)
        c = min(c, int((s > s.max() * max(p, q) * np.finfo(np.float64).eps).sum()))  # drop the zero spectrum
        us.append(u[:, :c])
        ss.append(s[:c])
        vs.append(vh[:c].T)
    u_orth = literal_polar(np.concatenate(us, axis=1))
    v_orth = literal_polar(np.concatenate(vs, axis=1))
    return alpha * u_orth @ np.diag(np.concatenate(ss)) @ v_orth.T


@pytest.mark.parametrize(("shape", "task_ranks"), [
    ((3, 5, 7), None),        # c_t = 5 // 3 = 1
    ((2, 8, 6), None),        # c_t = 3
    ((3, 5, 7), [1, 2, 2]),   # core space: r_t components each, sum = min(p, q)
    ((3, 5, 7), [3, 3, 9]),   # sum of kept components (11) > min(p, q): wide concatenations
    ((5, 4, 4), None),        # T > min(p, q) / 1: at least one component each
])
def test_matches_literal(random_tasks, shape, task_ranks):
    x = random_tasks(*shape, seed=3)
    expected = torch.from_numpy(literal_tsv(x.numpy(), 0.9, task_ranks))
    torch.testing.assert_close(tsv.merge(x, alpha=0.9, task_ranks=task_ranks), expected, rtol=1e-10, atol=1e-10)


def test_one_task_with_its_rank_is_itself():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 7, generator=g, dtype=torch.float64))[None]
    rank = int(torch.linalg.matrix_rank(x[0]))
    assert rank == 3
    torch.testing.assert_close(tsv.merge(x, alpha=0.5, task_ranks=[rank]), 0.5 * x[0], rtol=0, atol=1e-12)


def test_orthogonal_supports_give_the_sum():
    x = torch.zeros(2, 6, 7, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x[0, :2, :3] = torch.randn(2, 3, generator=g, dtype=torch.float64)   # rank 2
    x[1, 2:, 3:] = torch.randn(4, 4, generator=g, dtype=torch.float64)   # rank 4
    torch.testing.assert_close(tsv.merge(x, task_ranks=[2, 4]), x.sum(0), rtol=0, atol=1e-12)
    y = x.clone()
    y[1, 2:, 3:] = torch.outer(torch.arange(1.0, 5.0), torch.ones(4)).double() * 0.5  # rank 1 <= 6 // 2
    torch.testing.assert_close(tsv.merge(y), y.sum(0), rtol=0, atol=1e-12)


def rank_deficient_tasks() -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    factors = [(torch.randn(8, r, generator=g, dtype=torch.float64), torch.randn(r, 9, generator=g, dtype=torch.float64))
               for r in (1, 2, 1)]
    return torch.stack([b @ a for b, a in factors])  # (3, 8, 9), ranks 1, 2, 1 < 8 // 3


def test_rank_deficient_tasks_keep_only_their_nonzero_spectrum():
    # 8 // 3 = 2 components are asked of each task; task 0 and 2 have only one. Their zero
    # components (arbitrary directions) must not enter the polar factor: the default budget then
    # gives exactly what the true ranks give, and the merge commutes with rotations.
    x = rank_deficient_tasks()
    torch.testing.assert_close(tsv.merge(x), tsv.merge(x, task_ranks=[1, 2, 1]), rtol=0, atol=1e-12)
    expected = torch.from_numpy(literal_tsv(x.numpy(), 1.0))
    torch.testing.assert_close(tsv.merge(x), expected, rtol=1e-10, atol=1e-10)


def test_zero_tasks_contribute_nothing():
    x = rank_deficient_tasks()
    with_zero = torch.cat([x, torch.zeros(1, 8, 9, dtype=torch.float64)])  # (4, 8, 9)
    torch.testing.assert_close(tsv.merge(with_zero, task_ranks=[1, 2, 1, 3]), tsv.merge(x, task_ranks=[1, 2, 1]),
                               rtol=0, atol=1e-12)
    assert not tsv.merge(torch.zeros(2, 3, 4, dtype=torch.float64)).any()


def test_rotations_commute(random_tasks, orthogonal):
    x = random_tasks()
    left, right = orthogonal(5, 1), orthogonal(7, 2)
    rotated = left @ x @ right  # (T, 5, 7)
    for ranks in (None, [2, 1, 2]):
        torch.testing.assert_close(tsv.merge(rotated, task_ranks=ranks), left @ tsv.merge(x, task_ranks=ranks) @ right,
                                   rtol=1e-10, atol=1e-10)
    y = rank_deficient_tasks()
    left, right = orthogonal(8, 3), orthogonal(9, 4)
    torch.testing.assert_close(tsv.merge(left @ y @ right), left @ tsv.merge(y) @ right, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_does_not_mutate(random_tasks, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    assert tsv.merge(x).dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("ranks", [[1, 2], [1, 0, 2], [1, 2.0, 2], [True, 1, 1]])
def test_rejects_bad_task_ranks(random_tasks, ranks):
    with pytest.raises(ValueError, match="task_ranks"):
        tsv.merge(random_tasks(), task_ranks=ranks)


def core_like_tasks(ranks, k: int, seed: int) -> torch.Tensor:
    """(T, k, k) tasks of the given ranks: core matrices of adapters of mixed ranks."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(k, r, generator=g, dtype=torch.float64) @ torch.randn(r, k, generator=g,
                                                                                        dtype=torch.float64)
                        for r in ranks])


@pytest.mark.parametrize(("x", "what"), [
    (core_like_tasks([4, 8, 16, 4], 32, 0), "core space, mixed ranks: 8 components each, null ones included"),
    (core_like_tasks([8, 8, 8, 8], 32, 1), "core space, equal ranks: 8 each, all real"),
    (rank_deficient_tasks(), "full-space shaped, ranks 1, 2, 1 below 8 // 3"),
    (torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64), "full rank"),
    (torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64), "T > d: none each"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_literal_is_the_reference_codes(x, what):
    torch.testing.assert_close(tsv.merge_literal(x, alpha=0.9), 0.9 * reference_code.tsv(x), rtol=0, atol=1e-12)


def test_literal_equals_tsv_when_every_task_fills_its_share():
    # Every task has at least d // T non-zero components: nothing arbitrary enters, the two agree.
    x = core_like_tasks([8, 8, 8, 8], 32, 1)
    torch.testing.assert_close(tsv.merge_literal(x), tsv.merge(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(tsv.merge_literal(x), tsv.merge(x, task_ranks=[8] * 4), rtol=0, atol=1e-12)


def test_literal_follows_rounding_noise_where_a_task_falls_short():
    # Tasks of ranks 4, 8, 16, 4 in a k = 32 core: tsv keeps 4, 8, 16, 4 components (the paper's rule),
    # tsv_literal 8 of each, 4 of them from the null spaces of two tasks. Noise at 1e-12 of the
    # tasks' size moves tsv_literal by far more than that; tsv does not move.
    x = core_like_tasks([4, 8, 16, 4], 32, 0)
    noise = 1e-12 * x.norm() * torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    ours, literal = tsv.merge(x, task_ranks=[4, 8, 16, 4]), tsv.merge_literal(x)
    assert (literal - ours).norm() > 0.1 * ours.norm()  # the two rules differ by a lot here
    moved = (tsv.merge_literal(x + noise) - literal).norm() / literal.norm()
    assert moved > 1e-3, moved
    stayed = (tsv.merge(x + noise, task_ranks=[4, 8, 16, 4]) - ours).norm() / ours.norm()
    assert stayed < 1e-9, stayed
