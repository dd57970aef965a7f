"""Token-averaged losses split into micro-batches: weighted by what the loss averages over.

A causal LM's ``.loss`` is the mean over the batch's valid label tokens (``-100`` is ignored).
Micro-batched, the curvature must be the full batch's: micro-batches weighted by their valid
tokens (float64, the full batch's own estimate as the reference), or refused where the weights
cannot be known. Weighting by samples instead is measurably wrong, which these tests show too.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lr_batch_callback import hessian_eigenvalues
from lr_batch_callback.engine.batching import batch_size_of
from lr_batch_callback.engine.estimate import OperatorOptions
from lr_batch_callback.engine.weights import is_causal_lm, unit_counter

DTYPE = torch.float64
VOCAB = 19


class TinyForCausalLM(nn.Module):
    """A float64 GPT with Hugging Face's calling convention (``labels`` shifted inside the loss):
    Hugging Face's Llama computes RMSNorm and the loss in float32, too coarse for 1e-9."""

    def __init__(self) -> None:
        super().__init__()
        from tests.zoo import TinyGPT

        torch.manual_seed(0)
        self.gpt = TinyGPT(vocab=VOCAB, dim=8, context=8).to(DTYPE)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                labels: Tensor | None = None) -> Any:
        logits = self.gpt(input_ids)  # causal: right padding never reaches a valid position
        loss = None if labels is None else F.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return SimpleNamespace(logits=logits, loss=loss)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=12,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=16)
    return LlamaForCausalLM(config).to(DTYPE).train()


def _padded_batch() -> dict[str, Tensor]:
    """Four sequences of 8 tokens, right-padded to lengths 8, 3, 6 and 2 (labels -100)."""
    ids = torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(3))
    lengths = torch.tensor([8, 3, 6, 2])
    pad = torch.arange(8)[None, :] >= lengths[:, None]
    labels = ids.masked_fill(pad, -100)
    return {"input_ids": ids, "attention_mask": (~pad).long(), "labels": labels}


def _lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch).loss  # type: ignore[no-any-return]


def _top(model: nn.Module, loss_fn, batch, **options) -> tuple[Tensor, int | None]:
    res = hessian_eigenvalues(model, loss_fn, batch, k=2, tol=1e-10, max_iter=200, seed=0,
                              options=OperatorOptions(**options))
    assert res.converged
    return res.eigenvalues, res.num_tokens


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_token_mean_lm_loss_micro_batched_equals_the_full_batch(micro_batch_size: int) -> None:
    model, batch = TinyForCausalLM(), _padded_batch()
    full, tokens = _top(model, _lm_loss, batch)
    assert tokens == 7 + 2 + 5 + 1  # labels after the causal shift, padding excluded
    split, split_tokens = _top(model, _lm_loss, batch, micro_batch_size=micro_batch_size)
    assert split_tokens == tokens
    assert torch.allclose(split, full, rtol=1e-9, atol=0), (split - full)
    # The weighting matters: by samples the same micro-batches give another matrix.
    by_samples, _ = _top(model, _lm_loss, batch, micro_batch_size=micro_batch_size,
                         weight_fn=batch_size_of)
    assert float((by_samples - full).abs().max()) > 1e-3 * float(full.abs().max())


@pytest.mark.slow
def test_hugging_face_lm_loss_micro_batched_equals_the_full_batch() -> None:
    """Llama's float32 RMSNorm and loss reduce in another order per micro-batch: 1e-6."""
    model, batch = _llama(), _padded_batch()
    full, _ = _top(model, _lm_loss, batch)
    split, tokens = _top(model, _lm_loss, batch, micro_batch_size=1)
    assert tokens == 15
    assert torch.allclose(split, full, rtol=1e-6, atol=0), (split - full)
    by_samples, _ = _top(model, _lm_loss, batch, micro_batch_size=1, weight_fn=batch_size_of)
    assert float((by_samples - full).abs().max()) > 1e-3 * float(full.abs().max())


@pytest.mark.slow
def test_a_micro_batch_with_every_label_ignored_is_left_out() -> None:
    model, batch = TinyForCausalLM(), _padded_batch()
    batch["labels"][1] = -100  # no loss in this sequence: its token mean alone would be NaN
    full, _ = _top(model, _lm_loss, batch)
    split, tokens = _top(model, _lm_loss, batch, micro_batch_size=1)
    assert tokens == 7 + 5 + 1
    assert torch.allclose(split, full, rtol=1e-9, atol=0)


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 6), nn.Linear(6, 5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def _tuple_batch() -> tuple[Tensor, Tensor]:
    batch = _padded_batch()
    return batch["input_ids"], batch["labels"] % 5 - 100 * (batch["labels"] == -100)


def _token_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, 5), batch[1].reshape(-1))  # ignore_index=-100


@pytest.mark.slow
def test_split_batch_with_ignored_labels_and_unknown_weights_is_refused() -> None:
    torch.manual_seed(0)
    model = TokenClassifier().to(DTYPE)
    with pytest.raises(ValueError, match="weight_fn="):
        _top(model, _token_loss, _tuple_batch(), micro_batch_size=2)
    full, _ = _top(model, _token_loss, _tuple_batch())  # unsplit: nothing to weigh

    def valid_tokens(batch: tuple[Tensor, Tensor]) -> int:
        return int((batch[1] != -100).sum())

    split, tokens = _top(model, _token_loss, _tuple_batch(), micro_batch_size=2,
                         weight_fn=valid_tokens)
    assert tokens is None  # a user's count is not reported as label tokens
    assert torch.allclose(split, full, rtol=1e-9, atol=0)


def test_tokens_are_counted_with_the_shift_of_causal_models_only() -> None:
    batch = _padded_batch()
    assert is_causal_lm(_llama()) and is_causal_lm(TinyForCausalLM())
    assert not is_causal_lm(TokenClassifier())
    causal = unit_counter(_llama(), batch, weight_fn=None, samples=batch_size_of, split=True)
    plain = unit_counter(TokenClassifier(), batch, weight_fn=None, samples=batch_size_of,
                         split=True)
    assert (causal.kind, causal(batch)) == ("tokens", 15.0)
    assert (plain.kind, plain(batch)) == ("tokens", 19.0)
    with pytest.raises(ValueError, match="finite number"):
        unit_counter(TokenClassifier(), batch, weight_fn=lambda b: -1, samples=batch_size_of,
                     split=True)(batch)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Spectrum monitoring measures")
def test_the_monitor_logs_samples_and_tokens() -> None:
    from lightning import LightningModule, Trainer
    from torch.utils.data import DataLoader

    from lr_batch_callback import MonitorConfig, SpectrumMonitor
    from tests.lightning_helpers import MemoryLogger

    data = _padded_batch()
    rows = [{k: v[i] for k, v in data.items()} for i in range(4)] * 2

    class LanguageModel(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _llama().float()

        def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
            return _lm_loss(self.model, batch)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(rows, batch_size=4)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    logger = MemoryLogger()
    monitor = SpectrumMonitor(every_n_steps=1, config=MonitorConfig(
        k=1, max_iter=10, max_overhead=None, save_spectra=False))
    trainer = Trainer(max_steps=2, callbacks=[monitor], logger=logger, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(LanguageModel())
    assert set(logger.values("hessian/tokens").values()) == {15.0}
    assert set(logger.values("hessian/batch_size").values()) == {4.0}
