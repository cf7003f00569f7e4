"""The registry: names, hyper-parameters read from signatures, validation, and ``apply``;
plus the contract every registered method keeps (pure, dtype-preserving, (p, q) out)."""

from __future__ import annotations

import pytest
import torch

from coremerge import methods
from coremerge.methods import Method, apply, check_params, get_method, ta, tsv

ALL = ["ta", "ties", "dare", "dare_ties", "tsv", "iso_c", "iso_cts", "cart", "tsv_literal", "iso_c_literal"]


def test_the_registered_methods_and_their_defaults():
    assert list(methods.METHODS) == ALL
    assert {name: dict(m.hyperparams) for name, m in methods.METHODS.items()} == {
        "ta": {}, "ties": {"density": 0.7}, "dare": {"density": 0.1},
        "dare_ties": {"density": 0.1, "ties_density": 1.0},
        "tsv": {}, "iso_c": {}, "iso_cts": {"common_fraction": 0.8}, "cart": {"density": 0.04, "lam": 0.1},
        "tsv_literal": {}, "iso_c_literal": {},
    }
    assert [n for n, m in methods.METHODS.items() if m.random] == ["dare", "dare_ties"]
    assert [n for n, m in methods.METHODS.items() if m.uses_task_ranks] == ["tsv"]
    assert isinstance(get_method("tsv"), Method) and get_method("tsv").fn is tsv.merge


def test_registry_is_read_only_and_rejects_duplicates():
    with pytest.raises(TypeError):
        methods.METHODS["mine"] = methods.METHODS["ta"]  # type: ignore[index]
    with pytest.raises(ValueError, match="registered twice"):
        methods._registry(("ta", ta.merge), ("ta", ta.merge))


def test_unknown_method():
    with pytest.raises(ValueError, match=r"unknown merge method 'x'; expected one of: ta, ties, dare, "
                                         r"dare_ties, tsv, iso_c, iso_cts, cart, tsv_literal, iso_c_literal"):
        get_method("x")


def test_check_params_fills_defaults_and_normalises():
    assert check_params("ties", None) == {"density": 0.7}
    assert check_params("cart", {"lam": 2}) == {"density": 0.04, "lam": 2.0}
    assert check_params("dare", {"density": 1}) == {"density": 1.0}
    assert check_params("iso_cts", {"common_fraction": 0}) == {"common_fraction": 0.0}
    assert check_params("cart", {"lam": -0.5}) == {"density": 0.04, "lam": -0.5}


def test_unknown_hyperparameter_names_the_method_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) dens for merge method 'ties'; "
                                         r"valid hyper-parameters: density"):
        check_params("ties", {"dens": 0.5})
    with pytest.raises(ValueError, match="merge method 'ta'; valid hyper-parameters: none"):
        check_params("ta", {"density": 0.5})
    with pytest.raises(ValueError, match="alpha"):  # alpha is not a hyper-parameter
        check_params("ties", {"alpha": 0.5})


@pytest.mark.parametrize(("method", "params"), [
    ("ties", {"density": 0}), ("ties", {"density": 1.5}), ("dare", {"density": True}), ("cart", {"density": "0.1"}),
    ("dare_ties", {"density": float("nan")}), ("dare_ties", {"ties_density": 0}), ("dare_ties", {"ties_density": 2}),
    ("iso_cts", {"common_fraction": 1.2}),
    ("iso_cts", {"common_fraction": -0.1}), ("cart", {"lam": float("inf")}), ("cart", {"lam": False}),
])
def test_bad_values_are_rejected(method, params):
    (name,) = params
    with pytest.raises(ValueError, match=f"merge method '{method}': {name} must be"):
        check_params(method, params)


def test_params_must_be_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        check_params("ties", [("density", 0.5)])  # type: ignore[arg-type]


def test_apply_equals_the_direct_call(random_tasks):
    x = random_tasks()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(apply("dare_ties", x, alpha=0.5, params={"density": 0.3}, generator=g1),
                               methods.dare.merge_ties(x, alpha=0.5, density=0.3, generator=g2), rtol=0, atol=0)
    torch.testing.assert_close(apply("tsv", x, task_ranks=[1, 2, 2]), tsv.merge(x, task_ranks=[1, 2, 2]), rtol=0, atol=0)
    assert not torch.allclose(apply("tsv", x, task_ranks=[1, 2, 2]), apply("tsv", x))
    # generator and task_ranks are ignored by the methods that take neither
    torch.testing.assert_close(apply("ta", x, task_ranks=[1, 1, 1], generator=torch.Generator()), x.sum(0))


def test_apply_validates(random_tasks):
    x = random_tasks()
    with pytest.raises(ValueError, match="generator"):
        apply("dare", x)
    with pytest.raises(ValueError, match="alpha"):
        apply("ta", x, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        apply("ta", x, alpha=True)
    with pytest.raises(ValueError, match="density"):
        apply("ties", x, params={"density": 2.0})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_method_is_pure_and_keeps_dtype(random_tasks, name, dtype):
    x = random_tasks(dtype=dtype)
    before = x.clone()
    first = apply(name, x, alpha=0.7, generator=torch.Generator().manual_seed(0))
    second = apply(name, x, alpha=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, before)
    assert first.shape == (5, 7) and first.dtype == dtype and torch.isfinite(first).all()
    assert torch.equal(first, second)  # deterministic given the generator's seed


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_is_every_methods_last_step_bit_for_bit(random_tasks, name, dtype):
    # The contract sweeps rely on (CoreSpace.merge_core): the merge at alpha is exactly alpha
    # times the merge at 1, so a sweep over alpha runs the method once.
    x = random_tasks(dtype=torch.float64).to(dtype)
    one = apply(name, x, alpha=1.0, generator=torch.Generator().manual_seed(0))
    for alpha in (-0.3, 0.1, 0.7, 2.5):
        scaled = apply(name, x, alpha=alpha, generator=torch.Generator().manual_seed(0))
        assert torch.equal(scaled, alpha * one), (name, alpha)
