"""Twice-differentiable substitutes: in force in every thread while an estimate runs, then restored."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from lr_batch_callback.engine.differentiable import twice_differentiable


def _hardsigmoid_node() -> str:
    x = torch.randn(3, requires_grad=True)
    return type(F.hardsigmoid(x).grad_fn).__name__


def test_substitutes_apply_inside_the_block_and_are_restored_after() -> None:
    original = F.hardsigmoid
    assert _hardsigmoid_node() == "HardsigmoidBackward0"
    with twice_differentiable():
        assert _hardsigmoid_node() != "HardsigmoidBackward0"  # relu6(x + 3) / 6
        with twice_differentiable():  # nested blocks keep them
            assert _hardsigmoid_node() != "HardsigmoidBackward0"
        assert _hardsigmoid_node() != "HardsigmoidBackward0"
    assert F.hardsigmoid is original
    assert _hardsigmoid_node() == "HardsigmoidBackward0"


def test_other_threads_see_the_substitutes_until_the_last_block_ends() -> None:
    # Autograd runs CUDA backward (and checkpoint recomputation) on its own device threads: they
    # must see the substitutes while an estimate runs, so the switch is process-wide.
    inside, release, done = threading.Event(), threading.Event(), threading.Event()
    nodes: dict[str, str] = {}

    def estimate() -> None:
        with twice_differentiable():
            inside.set()
            release.wait(timeout=30)
        done.set()

    def device_thread() -> None:
        nodes["device"] = _hardsigmoid_node()

    worker = threading.Thread(target=estimate)
    worker.start()
    assert inside.wait(timeout=30)
    with twice_differentiable():  # a concurrent block ends first: the other one keeps them
        pass
    other = threading.Thread(target=device_thread)
    other.start()
    other.join(timeout=30)
    release.set()
    worker.join(timeout=30)
    assert done.is_set()
    assert nodes["device"] != "HardsigmoidBackward0"
    assert _hardsigmoid_node() == "HardsigmoidBackward0"  # restored by the last to leave


def test_substitutes_are_the_same_functions_with_a_double_backward() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    plain = F.hardsigmoid(x * 2).sum() + torch._weight_norm(weight, weight.norm(dim=1, keepdim=True)).sum()
    with twice_differentiable():
        subst = F.hardsigmoid(x * 2).sum() + torch._weight_norm(weight, weight.norm(dim=1, keepdim=True)).sum()
        (g,) = torch.autograd.grad(F.hardsigmoid(x * 2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)  # no "not implemented" error
    torch.testing.assert_close(subst, plain)
    assert h.shape == x.shape
