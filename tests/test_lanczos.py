"""Lanczos eigenvalues against dense eigvalsh of dense references."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from lr_batch_callback import hessian_eigenvalues
from lr_batch_callback.engine.lanczos import LanczosOptions, lanczos
from lr_batch_callback.engine.operators import CurvatureOperator
from tests.models import ce_loss, classification_batch, make
from tests.reference import dense_ggn, dense_hessian

# The cases measured at more than 3 s on the two-core test machine (`make test-fast` skips them).
SLOW_DENSE = {("hessian", "mlp_tanh"), ("hessian", "cnn_bn")}


def MatrixOperator(A: torch.Tensor) -> CurvatureOperator:
    """A dense symmetric matrix as an operator (for tests of Lanczos itself)."""
    return CurvatureOperator.from_matrix(A)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize(("curvature", "name"), [
    pytest.param(c, n, id=f"{c}-{n}", marks=[pytest.mark.slow] if (c, n) in SLOW_DENSE else [])
    for c in ("hessian", "ggn") for n in ("mlp_tanh", "cnn_bn", "dropout", "frozen")])
def test_top3_and_bottom_match_dense_float64(name: str, curvature: str) -> None:
    model = make(name)
    x, y = classification_batch(name)
    torch.manual_seed(7)
    if curvature == "hessian":
        M = dense_hessian(model, ce_loss, (x, y))
    else:
        M = dense_ggn(model, lambda f: F.cross_entropy(f, y), x)
    exact = torch.linalg.eigvalsh(M)
    torch.manual_seed(7)
    res = hessian_eigenvalues(model, ce_loss, (x, y), k=3, which="both", curvature=curvature,
                              tol=1e-9, seed=1)
    assert res.converged
    top, bottom = res.eigenvalues[:3], res.eigenvalues[-1]
    assert _relative(top, exact[-3:].flip(0)) < 1e-5
    scale = exact.abs().max()
    assert abs(bottom - exact[0]) <= 1e-5 * max(abs(exact[0]), 1e-3 * scale)
    assert torch.all(res.eigenvalues[:-1] >= res.eigenvalues[1:])  # largest first


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn_bn"])
def test_top3_float32_within_1e3(name: str) -> None:
    model64 = make(name)
    x, y = classification_batch(name)
    exact = torch.linalg.eigvalsh(dense_hessian(model64, ce_loss, (x, y)))
    model32 = make(name, dtype=torch.float32)
    res = hessian_eigenvalues(model32, ce_loss, (x.float(), y), k=3, tol=1e-5, seed=0)
    assert _relative(res.eigenvalues, exact[-3:].flip(0)) < 1e-3


@pytest.mark.slow
def test_smallest_only() -> None:
    model = make("mlp_tanh")
    batch = classification_batch("mlp_tanh")
    exact = torch.linalg.eigvalsh(dense_hessian(model, ce_loss, batch))
    res = hessian_eigenvalues(model, ce_loss, batch, k=2, which="smallest", tol=1e-10, seed=0)
    torch.testing.assert_close(res.eigenvalues, exact[:2].flip(0), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
def test_eigenvectors_are_eigenvectors() -> None:
    A = torch.diag(torch.linspace(-1, 5, 60, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(60, 60, dtype=torch.float64))
    A = Q @ A @ Q.T
    res = lanczos(MatrixOperator(A), k=2, tol=1e-10, seed=0, return_eigenvectors=True)
    for lam, v in zip(res.eigenvalues, res.eigenvectors):
        torch.testing.assert_close(A @ v, lam.item() * v, rtol=0, atol=1e-7)


def test_warm_start_with_exact_eigenvector_continues_after_breakdown() -> None:
    d = torch.arange(1.0, 41.0, dtype=torch.float64)
    op = MatrixOperator(torch.diag(d))
    v0 = torch.zeros(40, dtype=torch.float64)
    v0[10] = 1.0  # an eigenvector of a non-extremal eigenvalue: the Krylov space is invariant
    res = lanczos(op, k=2, v0=v0, tol=1e-10, seed=0)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([40.0, 39.0], dtype=torch.float64))
    assert res.converged


def test_warm_start_from_top_vector_converges_in_few_products() -> None:
    Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0, 1, 200, dtype=torch.float64) ** 4 * 10) @ Q.T
    cold = lanczos(MatrixOperator(A), k=1, tol=1e-6, seed=0, return_eigenvectors=True)
    warm = lanczos(MatrixOperator(A), k=1, tol=1e-6, seed=0, v0=cold.eigenvectors[0])
    assert warm.num_products < cold.num_products
    torch.testing.assert_close(warm.eigenvalues, cold.eigenvalues, rtol=1e-6, atol=0)


def test_unconverged_run_says_so() -> None:
    Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0, 1, 300, dtype=torch.float64)) @ Q.T
    with pytest.warns(RuntimeWarning, match="max_iter"):
        res = lanczos(MatrixOperator(A), k=1, tol=1e-12, max_iter=5, seed=0)
    assert not res.converged and res.num_products == 5


def test_no_two_step_trap() -> None:
    """hessian-eigenthings' k=1 default ran 2 steps and returned 0.116 for a true 2.694."""
    Q, _ = torch.linalg.qr(torch.randn(500, 500, dtype=torch.float64))
    ev = torch.linspace(-0.5, 2.694, 500, dtype=torch.float64)
    A = Q @ torch.diag(ev) @ Q.T
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = lanczos(MatrixOperator(A), k=1, seed=0)
    assert res.converged
    assert abs(res.eigenvalues[0].item() - 2.694) < 2.694 * 1e-4


@pytest.mark.slow
def test_check_every_gives_same_answer() -> None:
    Q, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-2, 3, 100, dtype=torch.float64)) @ Q.T
    a = lanczos(MatrixOperator(A), k=2, tol=1e-8, seed=3, options=LanczosOptions(check_every=1))
    b = lanczos(MatrixOperator(A), k=2, tol=1e-8, seed=3, options=LanczosOptions(check_every=5))
    torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-8, atol=0)
    assert b.num_products % 5 == 0 or b.num_products == 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer"),
        ({"k": 11}, "only 10 dimensions"),
        ({"tol": 0.0}, "tol must be a positive"),
        ({"tol": -1e-3}, "tol must be a positive"),
        ({"which": "middle"}, "which must be one of"),
        ({"max_iter": 0}, "max_iter must be"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lanczos(MatrixOperator(torch.eye(10, dtype=torch.float64)), **kwargs)


@pytest.mark.slow
def test_a_ggn_null_space_converges_at_zero_within_the_budget() -> None:
    # A GGN of rank 216 in 930 dimensions (batch 24 × 9 logit directions): λ_min is exactly 0,
    # under a continuum of small eigenvalues (2e-4 up), so a residual bound is unreachable at 0.
    # λ_min ≥ 0 bounds the error of the smallest Ritz value by the value itself.
    from lr_batch_callback.engine.isolation import isolated
    from lr_batch_callback.engine.lanczos import DEFAULT_TOL, FLOOR
    from lr_batch_callback.engine.operators import GGNOperator

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 10)).double()
    x = torch.randn(24, 12, dtype=torch.float64)
    y = torch.randint(0, 10, (24,))
    dense = torch.linalg.eigvalsh(dense_ggn(model, lambda f: F.cross_entropy(f, y), x))
    assert int((dense.abs() < 1e-10).sum()) == 930 - 216
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "stopped at max_iter" warning
        result = hessian_eigenvalues(model, ce_loss, (x, y), curvature="ggn", which="both",
                                     seed=0)
    assert result.converged and result.num_products < 100  # the default cap is 100
    top, bottom = result.eigenvalues.tolist()
    assert top == pytest.approx(float(dense[-1]), rel=DEFAULT_TOL)
    assert 0 <= bottom - float(dense[0]) <= DEFAULT_TOL * FLOOR * top
    assert float(result.error_bounds[1]) == pytest.approx(bottom)
    # Without the bound the same run ends unconverged at the cap.
    with isolated(model):
        op = GGNOperator(model, ce_loss, [(x, y)])
        op.lower_bound = None
        with pytest.warns(RuntimeWarning, match="stopped at max_iter=100"):
            assert not lanczos(op, k=1, which="both", seed=0).converged


def test_a_lower_bound_the_spectrum_contradicts_is_not_used() -> None:
    # An operator claiming λ ≥ 0 whose spectrum reaches -1 (a cluster from -1 to -0.9, slow to
    # resolve): the claim is dropped when a Ritz value falls below it, so no early stop at a
    # Ritz value on its way to -1 (with the bound applied blindly, λ_min comes out about -0.99).
    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    values = torch.cat([torch.linspace(-1.0, -0.9, 60), torch.linspace(0.0, 1e-3, 100),
                        torch.linspace(0.5, 2.0, 40)]).double()
    op = CurvatureOperator.from_matrix(Q @ torch.diag(values) @ Q.T)
    op.lower_bound = 0.0
    result = lanczos(op, k=1, which="both", tol=1e-6, max_iter=200, seed=0)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, torch.tensor([2.0, -1.0], dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
