"""DARE and DARE-TIES against literal implementations that draw the masks by the documented
convention (one CPU float32 torch.rand((p, q)) per task, task 0 first), DARE-TIES with a trim
against the Core Space paper's code's dare-ties, plus reproducibility."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coremerge.methods import dare, ta, ties

import reference_code  # tests/methods/reference_code.py: the Core Space paper's code, re-read


def literal_masks(num_tasks: int, p: int, q: int, density: float, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return np.stack([(torch.rand((p, q), generator=g) < density).numpy() for _ in range(num_tasks)])


def literal_drop(tasks: np.ndarray, density: float, seed: int) -> np.ndarray:
    num_tasks, p, q = tasks.shape
    keep = literal_masks(num_tasks, p, q, density, seed)
    out = np.zeros_like(tasks)
    for t in range(num_tasks):
        for i in range(p):
            for j in range(q):
                out[t, i, j] = tasks[t, i, j] / density if keep[t, i, j] else 0.0
    return out


def literal_dare(tasks: np.ndarray, density: float, seed: int, alpha: float) -> np.ndarray:
    return alpha * literal_drop(tasks, density, seed).sum(axis=0)


def literal_dare_ties(tasks: np.ndarray, density: float, seed: int, alpha: float) -> np.ndarray:
    dropped = literal_drop(tasks, density, seed)
    num_tasks, p, q = dropped.shape
    out = np.zeros((p, q))
    for i in range(p):
        for j in range(q):
            values = [dropped[t, i, j] for t in range(num_tasks) if dropped[t, i, j] != 0]
            elected = 1.0 if sum(values) >= 0 else -1.0
            agreeing = [v for v in values if np.sign(v) == elected]
            out[i, j] = alpha * (sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return out


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_matches_literal(random_tasks, density):
    x = random_tasks()
    expected = torch.from_numpy(literal_dare(x.numpy(), density, 11, 0.7))
    torch.testing.assert_close(dare.merge(x, alpha=0.7, density=density, generator=gen(11)), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_ties_matches_literal(random_tasks, density):
    x = random_tasks()
    expected = torch.from_numpy(literal_dare_ties(x.numpy(), density, 5, 0.7))
    torch.testing.assert_close(dare.merge_ties(x, alpha=0.7, density=density, generator=gen(5)), expected,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("ties_density", [0.05, 0.3, 0.7])
def test_dare_ties_with_a_trim_is_the_reference_codes(density, ties_density):
    # The paper's code: get_dare_delta_w(merge=False) then _process_ties(topK): the drop (here by our
    # mask convention; its own draws from torch's global generator) followed by the whole of TIES.
    x = torch.randn(4, 12, 12, generator=gen(2), dtype=torch.float64)  # core-space shaped
    dropped = torch.from_numpy(literal_drop(x.numpy(), density, 8))
    expected = 0.7 * reference_code.ties(dropped, ties_density)
    got = dare.merge_ties(x, alpha=0.7, density=density, ties_density=ties_density, generator=gen(8))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


def test_dare_ties_trim_at_one_trims_nothing(random_tasks):
    x = random_tasks()
    torch.testing.assert_close(dare.merge_ties(x, density=0.5, ties_density=1.0, generator=gen(1)),
                               dare.merge_ties(x, density=0.5, generator=gen(1)), rtol=0, atol=0)
    trimmed = dare.merge_ties(x, density=0.9, ties_density=0.2, generator=gen(1))
    assert 0 < int((trimmed != 0).sum()) < int((dare.merge_ties(x, density=0.9, generator=gen(1)) != 0).sum())
    with pytest.raises(ValueError, match="ties_density must be a number in"):
        dare.merge_ties(x, ties_density=0.0, generator=gen(1))


@pytest.mark.parametrize("fn", [dare.merge, dare.merge_ties])
def test_same_seed_same_result_other_seed_other_result(random_tasks, fn):
    x = random_tasks()
    first = fn(x, density=0.5, generator=gen(3))
    assert torch.equal(first, fn(x, density=0.5, generator=gen(3)))
    assert not torch.equal(first, fn(x, density=0.5, generator=gen(4)))


def test_masks_do_not_depend_on_dtype(random_tasks):
    x = random_tasks()
    out64 = dare.merge(x, density=0.3, generator=gen(9))
    out32 = dare.merge(x.float(), density=0.3, generator=gen(9))
    assert out32.dtype == torch.float32 and out64.dtype == torch.float64
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


def test_density_one_keeps_everything(random_tasks):
    x = random_tasks()
    torch.testing.assert_close(dare.merge(x, alpha=0.4, density=1.0, generator=gen(0)), ta.merge(x, alpha=0.4),
                               rtol=0, atol=0)
    torch.testing.assert_close(dare.merge_ties(x, alpha=0.4, density=1.0, generator=gen(0)),
                               ties.merge(x, alpha=0.4, density=1.0), rtol=0, atol=0)


def test_drops_about_one_minus_density():
    x = torch.ones(1, 200, 200, dtype=torch.float64)
    out = dare.merge(x, density=0.1, generator=gen(0))
    kept = float((out != 0).double().mean())
    assert abs(kept - 0.1) < 0.01
    assert torch.all((out == 0) | (out == 10.0))  # survivors rescaled by 1 / density


@pytest.mark.parametrize("fn", [dare.merge, dare.merge_ties])
def test_does_not_mutate(random_tasks, fn):
    x = random_tasks()
    before = x.clone()
    fn(x, density=0.5, generator=gen(1))
    assert torch.equal(x, before)


@pytest.mark.parametrize("fn", [dare.merge, dare.merge_ties])
def test_generator_is_required(random_tasks, fn):
    with pytest.raises(ValueError, match="generator"):
        fn(random_tasks())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fn", [dare.merge, dare.merge_ties])
def test_cpu_and_gpu_draw_the_same_masks(random_tasks, fn):
    x = random_tasks()
    cpu = fn(x, density=0.3, generator=gen(2))
    gpu = fn(x.cuda(), density=0.3, generator=gen(2))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-12, atol=1e-12)
