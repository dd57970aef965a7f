"""Curvature through activation checkpointing: exact, and without side effects.

Non-reentrant checkpointing (``torch.utils.checkpoint(use_reentrant=False)``, Hugging Face's
``gradient_checkpointing_enable()``, torchvision's ``memory_efficient=True``) re-runs the
checkpointed forward inside every product's backward pass. The reference for each model is the
same model with checkpointing off (float64, dense Hessian built row by row), and the model's
buffers and the RNG streams must come back bit for bit after the estimate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lr_batch_callback import hessian_eigenvalues
from lr_batch_callback.engine.estimate import OperatorOptions
from tests.reference import assert_same_state, dense_hessian, eigvalsh, snapshot

DTYPE = torch.float64


class Checkpointed(nn.Module):
    """Runs ``block`` through ``torch.utils.checkpoint`` when ``enabled``."""

    def __init__(self, block: nn.Module, reentrant: bool = False) -> None:
        super().__init__()
        self.block = block
        self.enabled = True
        self.reentrant = reentrant

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.block(x)
        return checkpoint(self.block, x, use_reentrant=self.reentrant)  # type: ignore[no-any-return]


def _set_checkpointing(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, Checkpointed):
            m.enabled = enabled


class Attention(nn.Module):
    def __init__(self, dim: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2)
                   for z in self.qkv(h).split(d, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return h + self.proj(att.transpose(1, 2).reshape(b, t, d))


def _bn_net(reentrant: bool = False) -> nn.Module:
    block = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.2))
    return nn.Sequential(Checkpointed(block, reentrant), nn.Linear(6, 6), nn.BatchNorm1d(6),
                         nn.Tanh(), Checkpointed(nn.Sequential(nn.Linear(6, 3)), reentrant))


def _cases() -> dict[str, tuple[nn.Module, tuple[Tensor, Tensor]]]:
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.arange(8) % 3
    seq, seq_y = torch.randn(3, 4, 6, dtype=DTYPE), torch.arange(3) % 3
    attention = nn.Sequential(nn.Linear(6, 6), Checkpointed(Attention()), nn.Flatten(),
                              nn.Linear(24, 3))
    hardsigmoid = nn.Sequential(nn.Linear(5, 6), Checkpointed(nn.Sequential(nn.Hardsigmoid(),
                                                                              nn.Linear(6, 3))))
    normed = nn.Sequential(Checkpointed(nn.Sequential(weight_norm(nn.Linear(5, 6)), nn.Tanh())),
                           nn.Linear(6, 3))
    return {
        "batchnorm_dropout": (_bn_net(), (x, y)),
        "batchnorm_dropout_reentrant": (_bn_net(reentrant=True), (x, y)),
        "sdpa": (attention, (seq, seq_y)),
        "hardsigmoid": (hardsigmoid, (x * 3, y)),
        "weight_norm": (normed, (x, y)),
    }


def _loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("name", sorted(_cases()))
def test_checkpointed_models_give_the_unchecked_eigenvalues(name: str) -> None:
    model, batch = _cases()[name]
    model = model.to(DTYPE).train()
    model(batch[0])  # non-trivial running statistics
    from lr_batch_callback.engine.differentiable import twice_differentiable
    from lr_batch_callback.engine.isolation import isolated

    _set_checkpointing(model, False)
    with isolated(model), twice_differentiable():
        torch.manual_seed(5)
        exact = eigvalsh(dense_hessian(model, _loss, batch))
    _set_checkpointing(model, True)
    before = snapshot(model)
    torch.manual_seed(5)  # the estimate draws dropout masks from the stream as the reference did
    before = snapshot(model)
    res = hessian_eigenvalues(model, _loss, batch, k=2, which="both", tol=1e-10, max_iter=200,
                              seed=0)
    assert_same_state(model, before)  # buffers, counters, RNG streams bit for bit
    expected = torch.stack([exact[-1], exact[-2], exact[1], exact[0]])
    radius = float(exact.abs().max())
    assert res.converged
    assert float((res.eigenvalues - expected).abs().max()) <= 1e-6 * radius, (res.eigenvalues,
                                                                              expected)


@pytest.mark.parametrize("keep_graphs", [True, False])
def test_checkpointed_batchnorm_buffers_are_bit_identical(keep_graphs: bool) -> None:
    torch.manual_seed(0)
    model = _bn_net().to(DTYPE).train()
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.arange(8) % 3
    model(x)
    before = snapshot(model)
    res = hessian_eigenvalues(model, _loss, (x, y), k=1, tol=1e-8, seed=0,
                              options=OperatorOptions(keep_graphs=keep_graphs, micro_batch_size=4))
    assert res.num_products > 3  # several products, each re-running the checkpointed forward
    assert_same_state(model, before)


def test_memory_efficient_densenet_keeps_every_buffer() -> None:
    from torchvision.models import DenseNet

    torch.manual_seed(0)
    model = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                     num_classes=3, memory_efficient=True).to(DTYPE).train()
    x, y = torch.randn(4, 3, 16, 16, dtype=DTYPE), torch.arange(4) % 3
    model(x)
    before = snapshot(model)
    res = hessian_eigenvalues(model, _loss, (x, y), k=1, tol=1e-6, max_iter=30, seed=0)
    assert_same_state(model, before)
    _set_memory_efficient(model, False)
    unchecked = hessian_eigenvalues(model, _loss, (x, y), k=1, tol=1e-6, max_iter=30, seed=0)
    assert torch.allclose(res.eigenvalues, unchecked.eigenvalues, rtol=1e-8)


def _set_memory_efficient(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if hasattr(m, "memory_efficient"):
            m.memory_efficient = enabled


def _fit_checkpointed(monitor: bool) -> tuple[dict[str, Tensor], int]:
    from lightning import Trainer, seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from lr_batch_callback import MonitorConfig, SpectrumMonitor
    from tests.lightning_helpers import MemoryLogger, TinyModule

    class CheckpointedModule(TinyModule):
        def __init__(self) -> None:
            super().__init__(batch_size=16)
            self.net = _bn_net()
            self.net[0].block[0] = nn.Linear(6, 6)  # TinyModule's data has 6 features

        def train_dataloader(self) -> DataLoader:
            data = TensorDataset(torch.randn(160, 6, generator=torch.Generator().manual_seed(0)),
                                 torch.arange(160) % 3)
            return DataLoader(data, batch_size=16)

    seed_everything(0)
    module = CheckpointedModule()
    logger = MemoryLogger()
    callbacks = [SpectrumMonitor(every_n_steps=2, config=MonitorConfig(
        k=1, max_iter=10, max_overhead=None, save_spectra=False))] if monitor else []
    trainer = Trainer(max_steps=10, callbacks=callbacks, logger=logger, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(module)
    return module.state_dict(), len(logger.values("hessian/lambda_max"))


@pytest.mark.filterwarnings("ignore:Spectrum monitoring measures")
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_checkpointing_in_a_lightning_run_is_invisible() -> None:
    """Training with the monitor gives the weights and buffers of training without it (the
    checkpointed block's own recomputation counts each batch twice in both runs: torch's
    behaviour, not the monitor's)."""
    plain, _ = _fit_checkpointed(monitor=False)
    monitored, logged = _fit_checkpointed(monitor=True)
    assert logged >= 4
    assert plain.keys() == monitored.keys()
    for key in plain:
        assert torch.equal(plain[key], monitored[key]), key
    assert int(monitored["net.0.block.1.num_batches_tracked"]) == 20  # 10 steps, recomputed once


def test_reentrant_checkpointing_without_substitution_names_use_reentrant_false() -> None:
    from lr_batch_callback.engine.differentiable import explain_missing_double_backward

    raw = RuntimeError("When use_reentrant=True, torch.utils.checkpoint is incompatible with "
                       ".grad() or passing an `inputs` parameter to .backward().")
    error = explain_missing_double_backward(raw)
    assert error is not raw and "use_reentrant=False" in str(error)


def _tiny_llama(checkpointing: dict[str, bool] | None) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=23, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(DTYPE).train()
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return model


def _lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch, labels=batch).loss  # type: ignore[no-any-return]


@pytest.mark.parametrize("reentrant", [False, True])
def test_hugging_face_gradient_checkpointing_gives_the_unchecked_eigenvalues(reentrant: bool
                                                                            ) -> None:
    ids = torch.randint(0, 23, (3, 7), generator=torch.Generator().manual_seed(1))
    model = _tiny_llama({"use_reentrant": reentrant})
    before = snapshot(model)
    checked = hessian_eigenvalues(model, _lm_loss, ids, k=2, tol=1e-9, max_iter=150, seed=0)
    assert_same_state(model, before)
    unchecked = hessian_eigenvalues(_tiny_llama(None), _lm_loss, ids, k=2, tol=1e-9, max_iter=150,
                                    seed=0)
    assert checked.converged and unchecked.converged
    assert torch.allclose(checked.eigenvalues, unchecked.eigenvalues, rtol=1e-7, atol=0)


@pytest.mark.filterwarnings("ignore:Spectrum monitoring measures")
def test_hugging_face_model_with_gradient_checkpointing_logs_lambda_max_in_a_trainer() -> None:
    from lightning import LightningModule, Trainer
    from torch.utils.data import DataLoader

    from lr_batch_callback import MonitorConfig, SpectrumMonitor
    from tests.lightning_helpers import MemoryLogger

    class LanguageModel(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny_llama({"use_reentrant": False}).float()

        def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
            return _lm_loss(self.model, batch)

        def train_dataloader(self) -> DataLoader:
            ids = torch.randint(0, 23, (32, 9), generator=torch.Generator().manual_seed(0))
            return DataLoader(list(ids), batch_size=8)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    logger = MemoryLogger()
    monitor = SpectrumMonitor(every_n_steps=2, config=MonitorConfig(
        k=1, max_iter=20, max_overhead=None, save_spectra=False))
    trainer = Trainer(max_steps=4, callbacks=[monitor], logger=logger, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(LanguageModel())
    values = logger.values("hessian/lambda_max")
    assert len(values) == 2 and all(v > 0 for v in values.values()), logger.rows
    assert monitor.skipped == 0
