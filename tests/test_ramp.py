"""BatchSizeRamp: a batch-size ramp by optimizer steps, samples or tokens, inside one epoch.

References: the accumulation windows and LRs are checked against hand-derived lists (the
landing rule of the ramp's docstring applied by hand), the LR against the scheduler's own
trajectory × the linear factor, and the weights against a plain-PyTorch loop that accumulates
the same batches over the same windows.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lr_batch_callback import BatchSizeLRScaling, BatchSizeRamp
from tests.lightning_helpers import TinyModule

BASE_LR = 0.05


def _decay(step: int) -> float:
    return 1.0 / (1 + 0.1 * step)


class LambdaModule(TinyModule):
    """TinyModule with SGD (no momentum) and a step LambdaLR whose trajectory is known."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=BASE_LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class WindowRecorder(Callback):
    """Per optimizer step: the batches accumulated into it and the LR the optimizer used."""

    def __init__(self) -> None:
        self.windows: list[int] = []
        self.used: list[float] = []
        self._batches = 0
        self._handle: Any = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_pre_hook(self._pre)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batches += 1

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.windows.append(self._batches)
        self.used.append(float(optimizer.param_groups[0]["lr"]))
        self._batches = 0

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle.remove()


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = dict(max_epochs=2, accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    options.update(kwargs)
    return Trainer(callbacks=callbacks, **options)


def _fit(tmp_path, callbacks, module=None, **kwargs) -> tuple[Trainer, LightningModule]:
    seed_everything(0)
    module = module or LambdaModule(n=256)
    trainer = _trainer(tmp_path, callbacks, **kwargs)
    trainer.fit(module)
    return trainer, module


# Per-device batch 16, 16 batches an epoch. Ramp 16 -> 32 from step 3 -> 64 from step 6:
# steps 0-2 take 1 batch (3 batches done); at step 3 a window of 2 may not start (3 is odd), so
# step 3 takes 1 more batch and accumulation 2 lands at step 4 (4 batches done); steps 4, 5 take
# 2 (8 done); accumulation 4 lands at step 6 on time (8 % 4 == 0); steps 6, 7 end the epoch at
# 16 batches and epoch 1 has 4 steps of 4.
RAMP = {0: 16, 3: 32, 6: 64}
WINDOWS = [1, 1, 1, 1, 2, 2, 4, 4, 4, 4, 4, 4]


def test_step_ramp_accumulates_the_scheduled_batches_and_the_lr_follows(tmp_path) -> None:
    base = WindowRecorder()
    _fit(tmp_path, [BatchSizeRamp(RAMP), base])
    assert base.windows == WINDOWS
    # Without LR scaling the LR is the scheduler's own trajectory.
    assert base.used == pytest.approx([BASE_LR * _decay(s) for s in range(len(WINDOWS))],
                                      rel=1e-12)
    rec = WindowRecorder()
    scaling = BatchSizeLRScaling(rule="linear", verbose=False)
    trainer, _ = _fit(tmp_path, [BatchSizeRamp(RAMP), scaling, rec])
    assert rec.windows == WINDOWS
    for step, (used, ref, window) in enumerate(zip(rec.used, base.used, WINDOWS, strict=True)):
        assert used == pytest.approx(ref * window, rel=1e-12, abs=0), step
    assert scaling.reference_batch_size == 16 and scaling.effective_batch_size == 64
    assert trainer.accumulate_grad_batches == 4


def test_the_lr_follows_whatever_the_callbacks_order(tmp_path) -> None:
    ramp = {0: 32, 4: 16}  # from the first step: the reference stays the Trainer's 16
    first, second = WindowRecorder(), WindowRecorder()
    _fit(tmp_path, [BatchSizeRamp(ramp), BatchSizeLRScaling(rule="linear", verbose=False), first])
    _fit(tmp_path, [BatchSizeLRScaling(rule="linear", verbose=False), BatchSizeRamp(ramp), second])
    # 32 from step 0 (2 batches), 16 (1 batch) from step 4: a decrease lands at once.
    assert first.windows == second.windows == [2, 2, 2, 2] + [1] * 8 + [1] * 16
    for step, (a, b, window) in enumerate(zip(first.used, second.used, first.windows,
                                              strict=True)):
        expected = BASE_LR * _decay(step) * window
        assert a == pytest.approx(expected, rel=1e-12) and b == pytest.approx(expected, rel=1e-12)


def test_weights_equal_a_plain_accumulation_loop(tmp_path) -> None:
    _, trained = _fit(tmp_path, [BatchSizeRamp(RAMP), BatchSizeLRScaling(rule="linear",
                                                                          verbose=False)])
    seed_everything(0)
    reference = LambdaModule(n=256)
    model = copy.deepcopy(reference.net)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR)
    batches = [b for _ in range(2) for b in reference.train_dataloader()]
    position = 0
    for step, window in enumerate(WINDOWS):
        opt.zero_grad()
        for x, y in batches[position:position + window]:
            (F.cross_entropy(model(x), y) / window).backward()
        position += window
        opt.param_groups[0]["lr"] = BASE_LR * _decay(step) * window
        opt.step()
    assert position == len(batches)
    for (name, got), want in zip(trained.net.state_dict().items(), model.state_dict().values(),
                                 strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_mid_ramp_continues_the_ramp_and_the_lr(tmp_path) -> None:
    full = WindowRecorder()
    _fit(tmp_path / "full", [BatchSizeRamp(RAMP), BatchSizeLRScaling(rule="linear",
                                                                      verbose=False), full])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    first = WindowRecorder()
    _fit(tmp_path / "first", [BatchSizeRamp(RAMP), BatchSizeLRScaling(rule="linear",
                                                                       verbose=False), first, ckpt],
         max_steps=5, enable_checkpointing=True)
    assert first.windows == WINDOWS[:5]
    path = tmp_path / "ckpt" / "epoch=0-step=5.ckpt"
    assert path.exists()
    state = torch.load(path, weights_only=False)["callbacks"]["BatchSizeRamp"]
    assert state["accumulation"] == 2
    resumed = WindowRecorder()
    ramp = BatchSizeRamp(RAMP)
    seed_everything(0)
    trainer = _trainer(tmp_path / "resumed", [ramp, BatchSizeLRScaling(rule="linear",
                                                                       verbose=False), resumed])
    with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before"):
        trainer.fit(LambdaModule(n=256), ckpt_path=path)
    assert resumed.windows == WINDOWS[5:]
    assert resumed.used == pytest.approx(full.used[5:], rel=1e-12)


def test_sample_and_token_ramps(tmp_path) -> None:
    # 64 samples after 4 steps of 16: accumulation 2 lands at once (4 batches done).
    samples = WindowRecorder()
    ramp = BatchSizeRamp({64: 32}, unit="sample")
    _fit(tmp_path, [ramp, samples], max_epochs=1)
    assert samples.windows == [1, 1, 1, 1] + [2] * 6
    assert ramp.seen == 256
    # 10 tokens a sample: 160 a batch; 400 tokens are passed after 3 batches (480), when a window
    # of 2 may not start (3 is odd): accumulation 2 lands one step later, at 4 batches done.
    tokens = WindowRecorder()
    ramp = BatchSizeRamp({0: 16, 400: 32}, unit="token", tokens_fn=lambda b: 10 * len(b[0]))
    _fit(tmp_path, [ramp, tokens], max_epochs=1)
    assert tokens.windows == [1] * 4 + [2] * 6
    assert ramp.seen == 2560


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(schedule={}), ValueError, "non-empty dict"),
    (dict(schedule={0: 16}, unit="epoch"), ValueError, "BatchSizeSchedule"),
    (dict(schedule={-1: 16}), ValueError, "schedule key -1"),
    (dict(schedule={"10": 16}), TypeError, "schedule key '10'"),
    (dict(schedule={10: 0}), ValueError, "the batch size at step 10 of schedule"),
    (dict(schedule={10: 16}, tokens_fn=3), TypeError, "tokens_fn"),
])
def test_bad_arguments_say_what_is_wrong(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        BatchSizeRamp(**kwargs)


def test_sizes_that_no_accumulation_gives_are_refused_before_training(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match=r"\[24\] are not multiples of .* 16"):
        _fit(tmp_path, [BatchSizeRamp({0: 16, 4: 24})])


def test_a_second_accumulation_schedule_is_refused(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="GradientAccumulationScheduler"):
        _fit(tmp_path, [BatchSizeRamp({4: 32}), GradientAccumulationScheduler({0: 1, 1: 2})])


def test_resume_with_another_unit_is_refused() -> None:
    ramp = BatchSizeRamp({4: 32}, unit="sample")
    with pytest.raises(MisconfigurationException, match="unit='step'"):
        ramp.load_state_dict({"seen": 0, "accumulation": None, "unit": "step"})
