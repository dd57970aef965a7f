"""Bad input and faults: each gives a clear error naming the value and the fix, or a warning and a
skipped (and logged) measurement while training goes on — never silent wrong numbers."""

from __future__ import annotations

import copy
import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lr_batch_callback import (
    BatchSizeLRCallback,
    BatchSizeSchedule,
    hessian_eigenvalues,
    scaling_factor,
    spectral_density,
)
from lr_batch_callback.engine.estimate import OperatorOptions
from tests.lightning_helpers import LRRecorder, MemoryLogger, TinyModule, flat_callback, make_dataset
from tests.models import SmallBNCNN, ce_loss, classification_batch, mlp_tanh
from tests.reference import assert_same_state, dense_hessian, eigvalsh, snapshot


class Snapshot(Callback):
    """Weights and batch after every optimizer step (runs after the measuring callback)."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[dict[str, torch.Tensor], Any]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.saved[trainer.global_step] = (copy.deepcopy(pl_module.state_dict()),
                                           tuple(t.clone() for t in batch))


def _always_within_budget(cb: BatchSizeLRCallback) -> BatchSizeLRCallback:
    # The time budget depends on machine load; these tests need measurements at known steps.
    cb.monitor.budget.max_overhead = None
    return cb


def _callback(**kwargs: Any) -> BatchSizeLRCallback:
    defaults = dict(monitor_every_n_steps=2, density_every=0, smallest=False, verbose=False,
                    save_spectra=False)
    defaults.update(kwargs)
    return _always_within_budget(flat_callback(**defaults))


def _fit(module: LightningModule, callbacks: list[Callback], tmp_path, epochs: int = 1,
         logger: Logger | bool = False, **kwargs: Any) -> Trainer:
    seed_everything(0)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, accelerator="cpu", devices=1,
                      logger=logger, enable_checkpointing=kwargs.pop("enable_checkpointing", False),
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, log_every_n_steps=1, **kwargs)
    trainer.fit(module)
    return trainer


def _ce(module: nn.Module, batch: Any) -> torch.Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _skip_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "measurement skipped" in str(w.message)]


# -- invalid arguments: the functional API ---------------------------------------------------------

@pytest.mark.parametrize("old,new,name,value", [
    (0, 16, "old_batch_size", "0"), (-8, 16, "old_batch_size", "-8"),
    (16, 0, "new_batch_size", "0"), (16, -1, "new_batch_size", "-1"),
])
@pytest.mark.parametrize("rule", ["linear", "sqrt", "none"])
def test_scaling_factor_rejects_non_positive_batch_sizes(rule, old, new, name, value) -> None:
    with pytest.raises(ValueError, match=rf"{name} must be an integer >= 1, got {value}"):
        scaling_factor(rule, old, new)


def test_scaling_factor_rejects_unknown_rule_naming_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"Unknown rule 'quadratic'.*'linear', 'sqrt', 'none'"):
        scaling_factor("quadratic", 16, 32)


def _linear_problem() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()  # 3 parameters
    return model, (torch.randn(8, 2, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))


def _mse(model: nn.Module, batch: Any) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("k,which,message", [
    (4, "largest", r"k=4 asks for 4 eigenvalues but the operator has only 3 dimensions.*k <= 3"),
    (2, "both", r"k=2 asks for 4 eigenvalues but the operator has only 3 dimensions.*k <= 1"),
    (0, "largest", r"k must be a positive integer, got 0"),
    (1.5, "largest", r"k must be a positive integer, got 1.5"),
])
def test_k_larger_than_the_parameter_count_is_a_clear_error(k, which, message) -> None:
    model, batch = _linear_problem()
    with pytest.raises(ValueError, match=message):
        hessian_eigenvalues(model, _mse, batch, k=k, which=which)


@pytest.mark.parametrize("tol", [0.0, -1e-3, float("nan"), float("inf")])
def test_non_positive_tol_is_a_clear_error(tol) -> None:
    model, batch = _linear_problem()
    with pytest.raises(ValueError, match=r"tol must be a positive finite number.*e\.g\. tol=1e-4"):
        hessian_eigenvalues(model, _mse, batch, tol=tol)


def test_unknown_curvature_names_the_accepted_ones() -> None:
    model, batch = _linear_problem()
    with pytest.raises(ValueError, match=r"curvature must be one of \('hessian', 'ggn'\), got 'fisher'"):
        hessian_eigenvalues(model, _mse, batch, curvature="fisher")
    with pytest.raises(ValueError, match="fisher"):
        spectral_density(model, _mse, batch, curvature="fisher")


def test_model_without_trainable_parameters_is_a_clear_error() -> None:
    model, batch = _linear_problem()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter with requires_grad=True.*Unfreeze"):
        hessian_eigenvalues(model, _mse, batch)
    assert not any(p.requires_grad for p in model.parameters())  # left frozen


def test_empty_batch_is_a_clear_error() -> None:
    model, (x, y) = _linear_problem()
    with pytest.raises(ValueError, match=r"at least one sample; got a batch of size 0"):
        hessian_eigenvalues(model, _mse, (x[:0], y[:0]))
    with pytest.raises(ValueError, match="No data"):
        hessian_eigenvalues(model, _mse, None)


def test_size_one_batch_matches_the_dense_hessian() -> None:
    torch.manual_seed(0)
    model = mlp_tanh().double()
    x, y = classification_batch("mlp_tanh", n=1)
    res = hessian_eigenvalues(model, ce_loss, (x, y), k=2, which="both", tol=1e-10, seed=0)
    dense = eigvalsh(dense_hessian(model, ce_loss, (x, y))).flip(0)
    expected = torch.cat([dense[:2], dense[-2:]])
    # One sample's cross-entropy Hessian has rank <= 2 x (classes - 1): tiny eigenvalues everywhere
    # but the ends, which must still come out right.
    assert res.converged
    assert torch.allclose(res.eigenvalues, expected, rtol=1e-8, atol=1e-10 * dense[0].item())


def test_loss_fn_that_does_not_return_a_scalar_is_a_clear_error() -> None:
    model, batch = _linear_problem()
    with pytest.raises(TypeError, match=r"must return a scalar tensor, got Tensor\(8, 1\)"):
        hessian_eigenvalues(model, lambda m, b: (m(b[0]) - b[1]) ** 2, batch)
    with pytest.raises(TypeError, match="must return a scalar tensor, got float"):
        hessian_eigenvalues(model, lambda m, b: 1.0, batch)


# -- invalid arguments: the callback -----------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    ({"rule": "quadratic"}, r"Unknown rule 'quadratic'"),
    ({"rule": ["linear", "cubic"]}, r"Unknown rule 'cubic'"),
    ({"reference_batch_size": 0}, r"reference_batch_size must be an integer >= 1 or None, got 0"),
    ({"reference_batch_size": -16}, r"reference_batch_size .* got -16"),
    ({"tol": 0.0}, r"tol must be a positive finite number, got 0.0"),
    ({"tol": -1e-3}, r"tol must be a positive finite number, got -0.001"),
    ({"k": 0}, r"k must be a positive integer, got 0"),
    ({"k": 2, "max_iter": 3, "smallest": True}, r"max_iter must be an integer >= 4, got 3"),
    ({"monitor_every_n_steps": -5}, r"monitor_every_n_steps .* got -5"),
])
def test_callback_rejects_bad_arguments_eagerly(kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        flat_callback(**kwargs)


def test_schedule_rejects_non_positive_batch_sizes() -> None:
    with pytest.raises(ValueError, match=r"the batch size at epoch 2 of scheduling must be an integer >= 1, got 0"):
        BatchSizeSchedule({0: 16, 2: 0})


def test_callback_k_larger_than_parameter_count_turns_monitoring_off_once(tmp_path) -> None:
    module = TinyModule(n=64)  # 163 parameters
    cb = _callback(k=200, max_iter=400, loss_fn=_ce)
    logger = MemoryLogger()
    with pytest.warns(UserWarning) as record:
        trainer = _fit(module, [cb], tmp_path, logger=logger)
    messages = [str(w.message) for w in record if "monitoring turned off" in str(w.message)]
    assert len(messages) == 1  # said once, not at every later measurement
    assert re.search(r"ValueError: k=200 asks for 200 eigenvalues but the operator has only 163 "
                     r"dimensions", messages[0])
    assert trainer.global_step == 4  # training went on
    assert logger.values("hessian/skipped") == {2: 1.0}
    assert not logger.values("hessian/lambda_max")
    assert cb.monitor.disabled is not None


# -- a model without trainable parameters under the callback (manual optimization) ------------------

class ManualModule(LightningModule):
    """Manual optimization, one or two optimizers, optionally all parameters frozen."""

    def __init__(self, two_optimizers: bool = False, frozen: bool = False, n: int = 64,
                 batch_size: int = 16) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.batch_size = batch_size
        self.two_optimizers = two_optimizers
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.data = make_dataset(n)
        if frozen:
            self.net.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        loss = _ce(self, batch)
        for opt in optimizers:
            opt.zero_grad()
        if loss.requires_grad:
            self.manual_backward(loss)
        for opt in optimizers:
            opt.step()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(1))

    def configure_optimizers(self) -> Any:
        if self.two_optimizers:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.05),
                    torch.optim.Adam(self.net[2].parameters(), lr=1e-3)]
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_callback_on_model_without_trainable_parameters_warns_and_training_continues(
        tmp_path) -> None:
    module = ManualModule(frozen=True)
    before = copy.deepcopy(module.state_dict())
    cb = _callback(loss_fn=_ce)
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match=r"monitoring turned off: ValueError: .*no parameter "
                                         r"with requires_grad=True"):
        trainer = _fit(module, [cb], tmp_path, logger=logger)
    assert trainer.global_step == 4
    assert logger.values("hessian/skipped") == {2: 1.0}
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


# -- non-finite values and exceptions in the middle of a fit -----------------------------------------

def _faulty_loss(kind: str, fail_at_step: int):
    def loss_fn(module: nn.Module, batch: Any) -> torch.Tensor:
        loss = _ce(module, batch)
        if module.trainer.global_step != fail_at_step:
            return loss
        if kind == "nan_loss":
            return loss * float("nan")
        if kind == "nan_products":  # finite loss and gradient, NaN second derivative
            w = module.net[0].weight
            return loss + (w - w.detach()).abs().pow(1.5).sum()
        raise RuntimeError("boom in the user's loss_fn")

    return loss_fn


@pytest.mark.parametrize("kind,message", [
    ("nan_loss", r"NonFiniteCurvatureError: The loss is not finite \(nan\)"),
    ("nan_products", r"NonFiniteCurvatureError: .*not finite"),
    ("exception", r"RuntimeError: boom in the user's loss_fn"),
])
def test_failed_measurement_mid_fit_is_a_logged_skip_and_training_is_unchanged(
        tmp_path, kind, message) -> None:
    seed_everything(0)
    reference = TinyModule(n=128)
    _fit(reference, [], tmp_path)

    seed_everything(0)
    module = TinyModule(n=128)
    cb = _callback(loss_fn=_faulty_loss(kind, fail_at_step=4))
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _fit(module, [cb], tmp_path, logger=logger)
    skips = _skip_warnings(record)
    assert len(skips) == 1 and re.search(message, skips[0]), skips
    assert trainer.global_step == 8  # all 128/16 steps ran
    lam = logger.values("hessian/lambda_max")
    assert set(lam) == {2, 6, 8} and all(math.isfinite(v) and v > 0 for v in lam.values())
    assert logger.values("hessian/skipped") == {2: 0.0, 4: 1.0, 6: 1.0, 8: 1.0}
    assert cb.monitor.measurements == 3 and cb.monitor.skipped == 1
    # The failed estimate left no trace: the run is bit-identical to one without the callback.
    for key, value in reference.state_dict().items():
        assert torch.equal(module.state_dict()[key], value), key


def test_checkpoint_is_written_when_measurements_fail(tmp_path) -> None:
    def nan_loss(module: nn.Module, batch: Any) -> torch.Tensor:
        return _ce(module, batch) * float("nan")

    cb = _callback(loss_fn=nan_loss, rule="linear")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.warns(UserWarning, match="measurement skipped"):
        _fit(TinyModule(n=64), [BatchSizeSchedule({0: 16, 1: 32}), cb, ckpt], tmp_path, epochs=2,
             enable_checkpointing=True)
    path = tmp_path / "ckpt" / "last.ckpt"
    assert path.exists()
    state = torch.load(path, weights_only=False)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("BatchSizeLRCallback"))
    assert saved["monitor"]["skipped"] == cb.monitor.skipped >= 2
    assert saved["monitor"]["measurements"] == 0
    assert saved["reference_batch_size"] == 16 and saved["effective_batch_size"] == 32
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == 0.05  # reference units


# -- KeyboardInterrupt in the functional API -----------------------------------------------------------

@pytest.mark.parametrize("interrupt_at_call", [1, 4])  # graph build / mid-Lanczos rebuild
def test_keyboard_interrupt_during_estimate_restores_model_bit_for_bit(interrupt_at_call) -> None:
    torch.manual_seed(0)
    model = SmallBNCNN().double().train()
    x, y = classification_batch("cnn_bn", n=16)
    model(x)  # non-trivial BatchNorm running statistics
    model.fc.eval()  # a mixed-mode model
    model.conv.bias.requires_grad_(False)
    ce_loss(model, (x, y)).backward()  # existing .grad tensors must survive untouched
    before = snapshot(model)
    calls = 0

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == interrupt_at_call:
            raise KeyboardInterrupt
        return ce_loss(m, batch)

    with pytest.raises(KeyboardInterrupt):
        hessian_eigenvalues(model, loss_fn, (x, y), k=2, seed=0,
                            options=OperatorOptions(keep_graphs=False))
    assert calls == interrupt_at_call
    assert_same_state(model, before)


# -- precision -----------------------------------------------------------------------------------------

def _dense_lambda_max(state: dict[str, torch.Tensor], batch: Any) -> float:
    model = TinyModule().double()
    model.load_state_dict(state)
    x, y = batch
    H = dense_hessian(model, _ce, (x.double(), y))
    return float(eigvalsh(H)[-1])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_estimate_runs_in_float32(tmp_path, precision) -> None:
    cb = _callback(loss_fn=_ce, tol=1e-6, max_iter=100, monitor_every_n_steps=3)
    snap = Snapshot()
    logger = MemoryLogger()
    with warnings.catch_warnings():
        # Lightning: "AMP with fp16 is not supported on CPU. Using precision='bf16-mixed' instead."
        warnings.filterwarnings("ignore", message=".*fp16 is not supported on CPU.*")
        trainer = _fit(TinyModule(n=64), [cb, snap], tmp_path, logger=logger, precision=precision)
    assert trainer.global_step == 4
    lam = logger.values("hessian/lambda_max")
    assert set(lam) == {3}
    state, batch = snap.saved[3]
    assert all(t.dtype == torch.float32 for t in state.values())
    # bf16 autocast would be off by ~1e-2; the float32 estimate agrees with float64 to 1e-4.
    assert lam[3] == pytest.approx(_dense_lambda_max(state, batch), rel=1e-4)


def test_bf16_true_disables_monitoring_with_a_clear_warning_but_scales_lr(tmp_path) -> None:
    cb = _callback(loss_fn=_ce, rule="linear")
    rec = LRRecorder()
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match=r"Hessian monitoring turned off: parameters are "
                                         r"\['torch.bfloat16'\].*precision='16-mixed' or "
                                         r"'bf16-mixed'"):
        _fit(TinyModule(n=64), [BatchSizeSchedule({0: 16, 1: 32}), cb, rec], tmp_path, epochs=2,
             logger=logger, precision="bf16-true")
    assert not logger.values("hessian/lambda_max")
    assert cb.factors == [2.0]
    assert rec.batch_sizes == [16] * 4 + [32] * 2
    assert rec.used == [0.05] * 4 + [pytest.approx(0.1, rel=1e-12)] * 2


# -- gradient clipping ------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_keeps_lr_scaling_exact(tmp_path, algorithm) -> None:
    schedule = {0: 16, 1: 64}
    kwargs = dict(gradient_clip_val=0.01, gradient_clip_algorithm=algorithm)
    base = LRRecorder()
    _fit(TinyModule(n=128, scheduler="cosine"), [BatchSizeSchedule(schedule), base], tmp_path,
         epochs=2, **kwargs)
    rec = LRRecorder()
    cb = _callback(rule="linear", loss_fn=_ce, monitor_every_n_steps=3)
    _fit(TinyModule(n=128, scheduler="cosine"), [BatchSizeSchedule(schedule), cb, rec], tmp_path,
         epochs=2, **kwargs)
    assert rec.batch_sizes == base.batch_sizes == [16] * 8 + [64] * 2
    for used, ref, bs in zip(rec.used, base.used, rec.batch_sizes, strict=True):
        assert used == pytest.approx(ref * bs / 16, rel=1e-12, abs=0)


# -- manual optimization ------------------------------------------------------------------------------------

def test_manual_optimization_without_loss_fn_turns_monitoring_off(tmp_path) -> None:
    logger = MemoryLogger()
    cb = _callback()
    with pytest.warns(UserWarning, match=r"Hessian monitoring turned off: Manual optimization.*"
                                         r"loss_fn=.*curvature_loss"):
        trainer = _fit(ManualModule(), [cb], tmp_path, logger=logger)
    assert trainer.global_step == 4
    assert not logger.values("hessian/lambda_max")
    assert cb.factors == [1.0]


def test_manual_optimization_with_loss_fn_measures(tmp_path) -> None:
    logger = MemoryLogger()
    snap = Snapshot()
    cb = _callback(loss_fn=_ce, tol=1e-6, max_iter=100)
    _fit(ManualModule(), [cb, snap], tmp_path, logger=logger)
    lam = logger.values("hessian/lambda_max")
    assert set(lam) == {2, 4}
    state, batch = snap.saved[4]
    assert lam[4] == pytest.approx(_dense_lambda_max(state, batch), rel=1e-4)


class MultiLRRecorder(Callback):
    """The LR each optimizer used at each of its steps."""

    def __init__(self) -> None:
        self.used: list[list[float]] = []
        self._handles: list[Any] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.used = [[] for _ in trainer.optimizers]
        self._handles = [
            opt.register_step_pre_hook(lambda o, a, k, i=i: self.used[i].append(
                float(o.param_groups[0]["lr"])))
            for i, opt in enumerate(trainer.optimizers)]

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self._handles:
            handle.remove()


def test_manual_optimization_with_two_optimizers_scales_each_by_its_rule(tmp_path) -> None:
    rec = MultiLRRecorder()
    cb = _callback(rule=["linear", "sqrt"], loss_fn=_ce, monitor_every_n_steps=None)
    # 64 samples: 4 steps at 16, then 1 step at 64
    _fit(ManualModule(two_optimizers=True), [BatchSizeSchedule({0: 16, 1: 64}), cb, rec],
         tmp_path, epochs=2)
    assert cb.effective_batch_size == 64 and cb.reference_batch_size == 16
    assert cb.factors == [4.0, 2.0]
    assert rec.used[0] == [0.05] * 4 + [pytest.approx(0.2, rel=1e-12)]
    assert rec.used[1] == [1e-3] * 4 + [pytest.approx(2e-3, rel=1e-12)]


def test_rule_list_of_wrong_length_names_the_counts(tmp_path) -> None:
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    cb = _callback(rule=["linear", "sqrt", "none"], loss_fn=_ce)
    with pytest.raises(MisconfigurationException, match="3 rules for 2 optimizers"):
        _fit(ManualModule(two_optimizers=True), [cb], tmp_path)


# -- where the batch size comes from -----------------------------------------------------------------------

class NoAttrModule(TinyModule):
    """No ``batch_size`` attribute; the loader's batch size grows from epoch 1 on."""

    def __init__(self) -> None:
        super().__init__(n=64)
        del self.batch_size

    def train_dataloader(self) -> DataLoader:
        size = 8 if self.current_epoch == 0 else 32
        return DataLoader(self.data, batch_size=size, shuffle=True,
                          generator=torch.Generator().manual_seed(1))


def test_without_batch_size_attribute_the_dataloader_tells_it(tmp_path) -> None:
    module = NoAttrModule()
    assert not hasattr(module, "batch_size")
    rec = LRRecorder()
    cb = _callback(rule="linear", monitor_every_n_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "cannot tell the batch size" warning
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        _fit(module, [cb, rec], tmp_path, epochs=2, reload_dataloaders_every_n_epochs=1)
    assert cb.reference_batch_size == 8 and cb.effective_batch_size == 32
    assert cb.factors == [4.0]
    assert rec.batch_sizes == [8] * 8 + [32] * 2
    assert rec.used == [0.05] * 8 + [pytest.approx(0.2, rel=1e-12)] * 2


class PreBatched(IterableDataset):
    """Yields ready-made batches of 12: the DataLoader (batch_size=None) does not know the size."""

    def __iter__(self):
        data = make_dataset(48)
        for i in range(0, 48, 12):
            yield data.tensors[0][i:i + 12], data.tensors[1][i:i + 12]


def test_when_nothing_tells_the_batch_size_the_first_batch_does(tmp_path) -> None:
    module = NoAttrModule()
    module.train_dataloader = lambda: DataLoader(PreBatched(), batch_size=None)
    rec = LRRecorder()
    cb = _callback(rule="linear", loss_fn=_ce)
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match=r"cannot tell the batch size.*read the first batch's "
                                         r"size; set `batch_size_attr`"):
        trainer = _fit(module, [cb, rec], tmp_path, logger=logger)
    assert trainer.global_step == 4
    assert cb.reference_batch_size == cb.effective_batch_size == 12
    assert cb.factors == [1.0]
    assert rec.used == [0.05] * 4
    assert logger.values("hessian/batch_size") == {2: 12.0, 4: 12.0}


class SizedBatches(IterableDataset):
    """Ready-made batches of the given sizes (batch_size=None: only the batches tell the size)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    def __iter__(self):
        data = make_dataset(sum(self.sizes))
        start = 0
        for size in self.sizes:
            yield data.tensors[0][start:start + size], data.tensors[1][start:start + size]
            start += size


def test_when_only_the_batches_tell_the_size_the_lr_follows_them(tmp_path) -> None:
    # 16 → 64 samples per batch, then one short batch of 8: the factor follows the change from
    # the second batch of 64 on, and one odd batch does not move it.
    module = NoAttrModule()
    module.train_dataloader = lambda: DataLoader(SizedBatches([16] * 3 + [64] * 4 + [8]),
                                                 batch_size=None)
    rec = LRRecorder()
    cb = _callback(rule="linear", loss_fn=_ce, monitor_every_n_steps=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot tell the batch size ... the first batch's"
        _fit(module, [cb, rec], tmp_path)
    assert rec.batch_sizes == [16] * 3 + [64] * 4 + [8]
    assert cb.reference_batch_size == 16 and cb.effective_batch_size == 64
    assert rec.used == ([0.05] * 4 + [pytest.approx(0.2, rel=1e-12)] * 3
                        + [pytest.approx(0.2, rel=1e-12)])


def test_size_one_batches_under_the_callback(tmp_path) -> None:
    logger = MemoryLogger()
    rec = LRRecorder()
    cb = _callback(rule="linear", loss_fn=_ce)
    _fit(TinyModule(batch_size=1, n=4), [BatchSizeSchedule({0: 1, 1: 4}), cb, rec], tmp_path,
         epochs=2, logger=logger)
    assert rec.batch_sizes == [1] * 4 + [4]
    assert rec.used == [0.05] * 4 + [pytest.approx(0.2, rel=1e-12)]
    lam = logger.values("hessian/lambda_max")
    assert lam and all(math.isfinite(v) for v in lam.values())

