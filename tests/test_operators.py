"""Hessian and GGN products against dense references built row by row with autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lr_batch_callback.engine.isolation import isolated
from lr_batch_callback.engine.operators import GGNOperator, HessianOperator, make_operator
from tests.models import ce_loss, classification_batch, make
from tests.reference import dense_ggn, dense_hessian, finite_difference_hvp

MODEL_NAMES = ["mlp_tanh", "cnn_bn", "dropout", "frozen"]


def _dense_from_operator(op) -> torch.Tensor:
    eye = torch.eye(op.dim, dtype=op.dtype)
    return op.matmat(eye)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("mlp_tanh", "cnn_bn")
                                  else n for n in MODEL_NAMES])
def test_hessian_products_match_dense_reference(name: str) -> None:
    model = make(name)
    batch = classification_batch(name)
    torch.manual_seed(3)  # the same dropout mask for the reference and the operator
    H_ref = dense_hessian(model, ce_loss, batch)
    torch.manual_seed(3)
    with isolated(model):
        op = HessianOperator(model, ce_loss, [batch])
        H = _dense_from_operator(op)
    torch.testing.assert_close(H, H_ref, rtol=1e-9, atol=1e-11)
    assert op.num_products == op.dim


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_ggn_products_match_dense_reference(name: str) -> None:
    model = make(name)
    x, y = classification_batch(name)
    torch.manual_seed(3)
    G_ref = dense_ggn(model, lambda f: F.cross_entropy(f, y), x)
    torch.manual_seed(3)
    with isolated(model):
        G = _dense_from_operator(GGNOperator(model, ce_loss, [(x, y)]))
    torch.testing.assert_close(G, G_ref, rtol=1e-9, atol=1e-11)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # positive semi-definite


def test_hessian_product_agrees_with_finite_differences_through_batchnorm() -> None:
    model = make("cnn_bn")
    batch = classification_batch("cnn_bn")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with isolated(model):
        hv = HessianOperator(model, ce_loss, [batch]).matvec(v)
        fd = finite_difference_hvp(model, ce_loss, batch, v)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_batched_products_equal_single_products(curvature: str) -> None:
    model = make("dropout")
    batch = classification_batch("dropout")
    V = torch.randn(5, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with isolated(model):
        op = make_operator(curvature, model, ce_loss, [batch], batched_products=True)
        assert not make_operator(curvature, model, ce_loss, [batch]).batched_products  # CPU
        batched = op.matmat(V)  # one vmap-batched backward pass (is_grads_batched)
        single = torch.stack([op.matvec(v) for v in V])
    torch.testing.assert_close(batched, single, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_multi_batch_average_is_sample_weighted(curvature: str) -> None:
    model = make("mlp_tanh")
    x, y = classification_batch("mlp_tanh", n=30)
    parts = [(x[:5], y[:5]), (x[5:], y[5:])]  # unequal sizes: a batch-count average would differ
    with isolated(model):
        whole = _dense_from_operator(make_operator(curvature, model, ce_loss, [(x, y)]))
        weighted = _dense_from_operator(make_operator(curvature, model, ce_loss, parts))
        recomputed = _dense_from_operator(
            make_operator(curvature, model, ce_loss, parts, keep_graphs=False))
    torch.testing.assert_close(weighted, whole, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(recomputed, whole, rtol=1e-9, atol=1e-11)


def test_recompute_mode_keeps_dropout_mask_fixed() -> None:
    model = make("dropout")
    batch = classification_batch("dropout")
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    with isolated(model):
        kept = HessianOperator(model, ce_loss, [batch]).matvec(v)
    with isolated(model):
        op = HessianOperator(model, ce_loss, [batch], keep_graphs=False)
        first, second = op.matvec(v), op.matvec(v)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, kept, rtol=1e-10, atol=1e-12)


def test_parameter_subset_is_the_matching_hessian_block() -> None:
    model = make("mlp_tanh")
    batch = classification_batch("mlp_tanh")
    H_full = dense_hessian(model, ce_loss, batch)
    layer = list(model[2].parameters())
    start = sum(p.numel() for p in model[0].parameters())
    size = sum(p.numel() for p in layer)
    with isolated(model):
        H_layer = _dense_from_operator(HessianOperator(model, ce_loss, [batch], params=layer))
    torch.testing.assert_close(H_layer, H_full[start:start + size, start:start + size],
                               rtol=1e-9, atol=1e-11)


def test_explicit_frozen_parameter_is_differentiated_and_stays_frozen() -> None:
    model = make("frozen")
    frozen = list(model[0].parameters())
    batch = classification_batch("frozen")
    with isolated(model):
        op = HessianOperator(model, ce_loss, [batch], params=frozen)
        assert op.dim == sum(p.numel() for p in frozen)
        assert torch.linalg.norm(op.matvec(torch.ones(op.dim, dtype=torch.float64))) > 0
    assert not any(p.requires_grad for p in frozen)


def test_errors_are_explicit() -> None:
    model = make("mlp_tanh")
    batch = classification_batch("mlp_tanh")
    with pytest.raises(ValueError, match="curvature must be one of"):
        make_operator("fisher", model, ce_loss, [batch])
    with pytest.raises(TypeError, match="scalar tensor"):
        HessianOperator(model, lambda m, b: m(b[0]), [batch])
    with pytest.raises(ValueError, match="at least one batch"):
        HessianOperator(model, ce_loss, [])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter"):
        HessianOperator(model, ce_loss, [batch])


def test_ggn_needs_exactly_one_model_call() -> None:
    model = make("mlp_tanh")
    batch = classification_batch("mlp_tanh")

    def twice(m, b):
        return ce_loss(m, b) + ce_loss(m, b)

    with isolated(model), pytest.raises(ValueError, match="exactly once"):
        GGNOperator(model, twice, [batch])
