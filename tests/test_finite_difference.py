"""Curvature products from first-order gradients (``product="finite_difference"`` / ``"auto"``).

References are dense Hessians built row by row with double backward (tests/reference.py), on
smooth zoo models in float64; kinked models must be refused (by the graph walk) or reported
unconverged (by the symmetry probe), never given a wrong value with ``converged=True``.
"""

from __future__ import annotations

import copy
import csv
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import TensorDataset

from lr_batch_callback import MonitorConfig, OperatorOptions, hessian_eigenvalues, load_spectra
from lr_batch_callback.engine import finite_difference as fdm
from lr_batch_callback.engine.differentiable import MissingDoubleBackwardError
from lr_batch_callback.engine.finite_difference import FiniteDifferenceHessian, default_step
from lr_batch_callback.engine.lanczos import lanczos
from lr_batch_callback.engine.smoothness import PiecewiseLinearError
from tests.lightning_helpers import TinyModule, flat_callback
from tests.reference import assert_same_state, dense_hessian, eigvalsh, snapshot, zoo_hessian
from tests.zoo import ZOO

SMOOTH = ["gpt", "lstm", "gru", "packed_lstm", "groupnorm_silu_cnn", "weight_norm_mlp",
          "logits_and_features", "sparse_embedding"]
KINKED = {"resnet18": "ReLU", "mobilenet_v3_small": "Hardswish", "transformer_encoder": "ReLU"}
FD = OperatorOptions(product="finite_difference")


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def _tanh_mlp(dropout: float = 0.0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(5, 12), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(12, 2))
    model = nn.Sequential(*layers).double()
    batch = (torch.randn(40, 5, dtype=torch.float64), torch.randn(40, 2, dtype=torch.float64))
    return model, batch


# -- accuracy against the dense Hessian ----------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "gpt" else n
                                  for n in SMOOTH])
def test_difference_eigenvalues_match_the_dense_hessian_on_smooth_zoo_models(name: str) -> None:
    case = ZOO[name]()
    before = snapshot(case.model)
    params = [p.detach().clone() for p in case.model.parameters()]
    opts = OperatorOptions(params=case.params, product="finite_difference")
    result = hessian_eigenvalues(case.model, case.loss_fn, case.batch, k=2, tol=1e-8,
                                 max_iter=min(case.dim, 200), seed=0, options=opts)
    expected = eigvalsh(zoo_hessian(case)).flip(0)[:2]
    assert result.product == "finite_difference"
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, expected, rtol=5e-7, atol=0.0)
    assert_same_state(case.model, before)
    assert all(torch.equal(a, b) for a, b in zip(params, case.model.parameters()))


def test_products_match_dense_hessian_products_and_restore_parameters_bit_for_bit() -> None:
    model, batch = _tanh_mlp()
    H = dense_hessian(model, _mse, batch)
    saved = [p.detach().clone() for p in model.parameters()]
    operator = FiniteDifferenceHessian(model, _mse, [batch])
    V = torch.randn(3, operator.dim, dtype=torch.float64)
    got = operator.matmat(V)
    # float64 at the default step: rounding-limited, ~1e-6 of each product
    assert float((got - V @ H).norm() / (V @ H).norm()) < 1e-5
    # Restored from a saved copy, not by subtracting the step back.
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))
    assert operator.num_products == 3
    assert torch.equal(operator.matvec(torch.zeros(operator.dim, dtype=torch.float64)),
                       torch.zeros(operator.dim, dtype=torch.float64))


def test_parameters_are_restored_when_a_product_fails() -> None:
    model, batch = _tanh_mlp()
    saved = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def flaky(m: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return _mse(m, b)

    operator = FiniteDifferenceHessian(model, flaky, [batch])
    operator.matvec(torch.randn(operator.dim, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="boom"):
        operator.matvec(torch.randn(operator.dim, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters()))


def test_dropout_masks_are_the_build_masks_in_every_product() -> None:
    model, batch = _tanh_mlp(dropout=0.3)
    model.train()
    torch.manual_seed(7)
    H = dense_hessian(model, _mse, batch)  # one forward: the mask of seed 7's first draw
    torch.manual_seed(7)
    before = snapshot(model)
    result = hessian_eigenvalues(model, _mse, batch, k=3, tol=1e-9, max_iter=200, seed=0,
                                 options=FD)
    torch.testing.assert_close(result.eigenvalues, eigvalsh(H).flip(0)[:3], rtol=1e-6, atol=0.0)
    assert result.converged
    assert_same_state(model, before)


def test_micro_batches_are_weighted_like_the_exact_operator() -> None:
    model, batch = _tanh_mlp()
    opts = OperatorOptions(product="finite_difference", micro_batch_size=16)  # 16 + 16 + 8
    result = hessian_eigenvalues(model, _mse, batch, k=2, tol=1e-9, max_iter=200, seed=0,
                                 options=opts)
    expected = eigvalsh(dense_hessian(model, _mse, batch)).flip(0)[:2]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0.0)
    assert result.num_samples == 40


def test_default_step_is_relative_to_the_parameters_and_the_precision() -> None:
    root = torch.finfo(torch.float32).eps ** 0.5
    assert default_step(1000.0, torch.float32) == pytest.approx(root * fdm.STEP_SCALE * 1000.0)
    assert default_step(3.0, torch.float32) == pytest.approx(root)  # the floor: small models
    assert default_step(1e-3, torch.float64) == default_step(1.0, torch.float64)
    model, batch = _tanh_mlp()
    assert FiniteDifferenceHessian(model, _mse, [batch], step=1e-4).step == 1e-4
    norm = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm())
    assert FiniteDifferenceHessian(model, _mse, [batch]).step == pytest.approx(
        default_step(norm, torch.float64))


# -- kinks: refused, or caught by the symmetry probe ---------------------------------------------
@pytest.mark.parametrize("name", sorted(KINKED))
def test_piecewise_linear_models_are_refused_with_the_operations_named(name: str) -> None:
    case = ZOO[name]()
    before = snapshot(case.model)
    opts = OperatorOptions(params=case.params, product="finite_difference")
    with pytest.raises(PiecewiseLinearError, match=KINKED[name]) as info:
        hessian_eigenvalues(case.model, case.loss_fn, case.batch, options=opts)
    assert "product='exact'" in str(info.value)
    assert_same_state(case.model, before)


def test_symmetry_probe_reports_kinks_the_walk_missed_as_unconverged(monkeypatch) -> None:
    monkeypatch.setattr(fdm, "kinks_on_the_way", lambda loss, params: Counter())
    case = ZOO["resnet18"]()
    case.model.float()
    batch = tuple(t.float() if t.is_floating_point() else t for t in case.batch)
    operator = FiniteDifferenceHessian(case.model, case.loss_fn, [batch], params=case.params)
    with pytest.warns(RuntimeWarning, match="product='finite_difference'"):
        result = lanczos(operator, k=1, tol=1e-2, seed=0, max_iter=30)
    assert not result.converged
    assert result.asymmetry > fdm.DIFFERENCE_SYMMETRY


# -- product="auto" ------------------------------------------------------------------------------
class _OnceTanh(torch.autograd.Function):
    """tanh with a backward PyTorch cannot differentiate again."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Net(nn.Module):
    def __init__(self, activation: str) -> None:
        super().__init__()
        self.a, self.b, self.activation = nn.Linear(5, 12), nn.Linear(12, 2), activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h = {"once": _OnceTanh.apply, "tanh": torch.tanh,
             "once_relu": lambda t: _OnceTanh.apply(torch.relu(t))}[self.activation](h)
        return self.b(h)


def _net(activation: str) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model, batch = _tanh_mlp()
    net = _Net(activation).double()
    net.a.load_state_dict(model[0].state_dict())
    net.b.load_state_dict(model[2].state_dict())
    return net, batch


def test_auto_falls_back_to_differences_where_double_backward_is_missing() -> None:
    net, batch = _net("once")
    with pytest.raises(MissingDoubleBackwardError, match="once_differentiable"):
        hessian_eigenvalues(net, _mse, batch)
    result = hessian_eigenvalues(net, _mse, batch, k=2, tol=1e-9, max_iter=200, seed=0,
                                 options=OperatorOptions(product="auto"))
    assert result.product == "finite_difference"
    reference, _ = _net("tanh")  # the same function, twice differentiable
    expected = eigvalsh(dense_hessian(reference, _mse, batch)).flip(0)[:2]
    torch.testing.assert_close(result.eigenvalues, expected, rtol=1e-6, atol=0.0)


def test_auto_keeps_the_exact_product_where_it_exists() -> None:
    net, batch = _net("tanh")
    auto = hessian_eigenvalues(net, _mse, batch, k=2, tol=1e-10, max_iter=200, seed=0,
                               options=OperatorOptions(product="auto"))
    exact = hessian_eigenvalues(net, _mse, batch, k=2, tol=1e-10, max_iter=200, seed=0)
    assert auto.product == exact.product == "exact"
    assert torch.equal(auto.eigenvalues, exact.eigenvalues)


def test_auto_names_both_reasons_when_neither_product_works() -> None:
    net, batch = _net("once_relu")
    with pytest.raises(MissingDoubleBackwardError, match="once_differentiable") as info:
        hessian_eigenvalues(net, _mse, batch, options=OperatorOptions(product="auto"))
    assert "ReLU" in str(info.value) and "Finite differences" in str(info.value)
    with pytest.raises(MissingDoubleBackwardError, match="curvature='ggn'"):
        hessian_eigenvalues(_net("once")[0], _mse, batch, curvature="ggn",
                            options=OperatorOptions(product="auto"))


def test_fused_attention_is_kept_by_differences_and_swapped_by_the_exact_product() -> None:
    seen: list[bool] = []  # whether the fused (flash) kernels were allowed at each forward

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            seen.append(torch.backends.cuda.flash_sdp_enabled())
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y).mean(1)

    torch.manual_seed(0)
    model = Attention().double()
    batch = (torch.randn(4, 6, 8, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))
    exact = hessian_eigenvalues(model, _mse, batch, tol=1e-9, max_iter=200, seed=0)
    assert seen and not any(seen)  # the exact product runs on the math substitute
    seen.clear()
    fd = hessian_eigenvalues(model, _mse, batch, tol=1e-9, max_iter=200, seed=0, options=FD)
    assert seen and all(seen)  # differences keep PyTorch's own (fused) kernel
    torch.testing.assert_close(fd.eigenvalues, exact.eigenvalues, rtol=1e-6, atol=0.0)


# -- bad input -----------------------------------------------------------------------------------
def test_bad_product_options_are_refused_with_what_to_change() -> None:
    with pytest.raises(ValueError, match=r"product must be one of .*'finite_difference'"):
        OperatorOptions(product="fd")
    with pytest.raises(ValueError, match="step"):
        OperatorOptions(product="finite_difference", step=-1e-3)
    with pytest.raises(ValueError, match="product='exact' takes none"):
        OperatorOptions(step=1e-3)
    model, batch = _tanh_mlp()
    with pytest.raises(ValueError, match="Hessian products only"):
        hessian_eigenvalues(model, _mse, batch, curvature="ggn", options=FD)
    with pytest.raises(ValueError, match="Hessian products only"):
        MonitorConfig(curvature="ggn", product="finite_difference")
    with pytest.raises(ValueError, match="product must be one of"):
        MonitorConfig(product="exactly")


# -- in a training run ---------------------------------------------------------------------------
class _Saved(Callback):
    """Weights and batch at each measured step (runs after the measuring callback)."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[dict, tuple]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % 2 == 0:
            self.saved[trainer.global_step] = (copy.deepcopy(pl_module.state_dict()),
                                               tuple(t.clone() for t in batch))


def test_monitor_with_differences_logs_the_dense_lambda_max_and_says_which_product(tmp_path) -> None:
    seed_everything(0)
    module = TinyModule(n=64).double()
    module.data = TensorDataset(module.data.tensors[0].double(), module.data.tensors[1])
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    cb = flat_callback(monitor_every_n_steps=2, tol=1e-8, max_iter=60, max_overhead=None,
                       density_every=0, critical_sharpness=False, product="finite_difference",
                       loss_fn=loss_fn)
    saved = _Saved()
    logger = CSVLogger(tmp_path, name="fd")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(max_steps=4, callbacks=[cb, saved], logger=logger, log_every_n_steps=1,
                enable_progress_bar=False, enable_checkpointing=False,
                default_root_dir=tmp_path).fit(module)
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("hessian/lambda_max")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["hessian/finite_difference"]) == 1.0 for r in rows)
    assert [r["product"] for r in load_spectra(logger.log_dir)] == ["finite_difference"] * 2
    for row in rows:
        state, batch = saved.saved[int(row["step"])]
        reference = TinyModule(n=64).double()
        reference.load_state_dict(state)
        dense = eigvalsh(dense_hessian(reference, loss_fn, batch))[-1]
        assert float(row["hessian/lambda_max"]) == pytest.approx(float(dense), rel=1e-6)
