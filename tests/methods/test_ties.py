"""TIES against a literal per-entry implementation (Python loops, float64) and against the Core Space
paper's code (its top-k rule, re-read), pinned conventions (keep count, threshold ties, zero sums,
exact zeros) and symmetry properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import ties

import reference_code  # tests/methods/reference_code.py: the Core Space paper's code, re-read


def literal_ties(tasks: np.ndarray, density: float, alpha: float) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    k = min(p * q, int(density * p * q) + 1)  # the TIES and Core Space papers' code
    kept = np.zeros((num_tasks, p, q), dtype=bool)
    for t in range(num_tasks):
        magnitudes = sorted((abs(tasks[t, i, j]) for i in range(p) for j in range(q)), reverse=True)
        threshold = magnitudes[k - 1]
        for i in range(p):
            for j in range(q):
                kept[t, i, j] = abs(tasks[t, i, j]) >= threshold and tasks[t, i, j] != 0
    out = np.zeros((p, q))
    for i in range(p):
        for j in range(q):
            values = [tasks[t, i, j] for t in range(num_tasks) if kept[t, i, j]]
            elected = 1.0 if sum(values) >= 0 else -1.0
            agreeing = [v for v in values if np.sign(v) == elected]
            out[i, j] = alpha * (sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return out


@pytest.mark.parametrize("density", [0.04, 0.2, 0.5, 0.7, 1.0])
def test_matches_literal(random_tasks, density):
    x = random_tasks()
    expected = torch.from_numpy(literal_ties(x.numpy(), density, 0.6))
    torch.testing.assert_close(ties.merge(x, alpha=0.6, density=density), expected, rtol=0, atol=1e-12)


def test_pinned_small_example():
    # entry 0: kept 1, 3 -> sign +, mean 2;  entry 1: kept -2, 1 -> sum -1, sign -, mean of {-2}
    x = torch.tensor([[[1.0, -2.0]], [[3.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(ties.merge(x, density=1.0), torch.tensor([[2.0, -2.0]], dtype=torch.float64))


def test_zero_sum_elects_plus():
    x = torch.tensor([[[1.0]], [[-1.0]]], dtype=torch.float64)
    torch.testing.assert_close(ties.merge(x, density=1.0), torch.tensor([[1.0]], dtype=torch.float64))


def test_exact_zeros_are_never_kept():
    # Counting the zeros would halve both entries.
    x = torch.tensor([[[0.0, 2.0]], [[4.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(ties.merge(x, density=1.0), torch.tensor([[4.0, 2.0]], dtype=torch.float64))


def test_magnitude_ties_at_the_threshold_are_all_kept():
    # k = int(0.25 * 4) + 1 = 2, the 2nd largest magnitude is 1: all three entries of magnitude 1 stay.
    x = torch.tensor([[[1.0, -1.0, 1.0, 0.5]]], dtype=torch.float64)
    torch.testing.assert_close(ties.merge(x, density=0.25), torch.tensor([[1.0, -1.0, 1.0, 0.0]], dtype=torch.float64))


def test_keeps_the_requested_count_per_task(random_tasks):
    x = random_tasks(num_tasks=1)  # one task, no sign conflicts: the output is the trimmed task
    out = ties.merge(x, density=0.3)
    assert int((out != 0).sum()) == 11  # int(0.3 * 35) + 1 = int(10.5) + 1; PEFT and mergekit keep 10
    kept = out != 0
    assert x[0].abs()[kept].min() >= x[0].abs()[~kept].max()


def test_one_task_with_density_one_is_itself(random_tasks):
    x = random_tasks(num_tasks=1)
    torch.testing.assert_close(ties.merge(x, alpha=0.8, density=1.0), 0.8 * x[0], rtol=0, atol=0)


def test_sign_flips_and_permutations_commute(random_tasks):
    x = random_tasks()
    rows = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0], dtype=torch.float64)[:, None]  # (p, 1)
    cols = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)  # (q,)
    ref = ties.merge(x, density=0.5)
    torch.testing.assert_close(ties.merge(rows * x * cols, density=0.5), rows * ref * cols, rtol=0, atol=0)
    torch.testing.assert_close(ties.merge(x[[2, 0, 1]], density=0.5), ref, rtol=0, atol=1e-15)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(ties.merge(x[:, perm], density=0.5), ref[perm], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_dtype_and_does_not_mutate(random_tasks, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    assert ties.merge(x).dtype == dtype
    assert torch.equal(x, before)


@pytest.mark.parametrize("density", [0.0, 1.5, True, float("nan")])
def test_rejects_bad_density(random_tasks, density):
    with pytest.raises(ValueError, match="density"):
        ties.merge(random_tasks(), density=density)


@pytest.mark.parametrize(("shape", "seed"), [((4, 32, 32), 0), ((8, 20, 20), 1), ((3, 5, 7), 2), ((2, 1, 1), 3)])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.29, 0.5, 0.7, 0.999, 1.0])
def test_equals_the_reference_code(shape, seed, density):
    # Core-space shaped stacks (k x k, K = k^2 entries): the keep count int(d K) + 1 is what moves a
    # merge by a few percent against round(d K) or int(d K); 0.29 * K is a float artifact for K = 100.
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(ties.merge(x, density=density), reference_code.ties(x, density), rtol=0, atol=1e-15)
    if density < 1:  # its percent form (topK: 70 in its NLI scripts) is the same fraction
        torch.testing.assert_close(ties.merge(x, density=density), reference_code.ties(x, density * 100),
                                   rtol=0, atol=1e-15)


def test_equals_the_reference_code_with_ties_at_the_threshold_and_zeros():
    # Task 0 takes magnitudes 0, 1, 2 and task 1 takes 0, 4, 8: many exact ties at every threshold,
    # but no two kept values sum to exactly 0, so the zero-sum conventions (ours +, theirs the
    # majority sign) are not involved.
    g = torch.Generator().manual_seed(7)
    levels = torch.tensor([[0.0, 1.0, 2.0], [0.0, 4.0, 8.0]], dtype=torch.float64)  # (T, 3)
    picks = torch.randint(0, 3, (2, 9, 9), generator=g)
    x = torch.gather(levels, 1, picks.reshape(2, -1)).reshape(2, 9, 9)
    x = x * (torch.randint(0, 2, (2, 9, 9), generator=g) * 2 - 1)  # (2, 9, 9), random signs
    for density in (0.1, 0.3, 0.5, 0.8, 1.0):
        torch.testing.assert_close(ties.merge(x, density=density), reference_code.ties(x, density), rtol=0, atol=0)
