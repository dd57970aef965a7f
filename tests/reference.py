"""Independent dense references for the tests: curvature matrices built row by row.

Built with plain autograd double backward (never ``torch.func.hessian``, which is wrong through
BatchNorm in train mode: largest entry error 0.084 on entries of 0.48 in float64), on one forward pass so that dropout masks and BatchNorm batch
statistics are the ones of that pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn


def _flat(tensors: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    return torch.cat([
        (t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, params)
    ])


def dense_hessian(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                  params: Sequence[Tensor] | None = None) -> Tensor:
    """The Hessian of loss_fn(model, batch) w.r.t. ``params``, one row per double backward."""
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    g = _flat(grads, params)
    rows = []
    for i in range(g.numel()):
        if g[i].requires_grad:
            row = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
            rows.append(_flat(row, params))
        else:
            rows.append(torch.zeros_like(g))
    H = torch.stack(rows).detach()
    return (H + H.T) / 2


def dense_ggn(model: nn.Module, loss_of_output: Callable[[Tensor], Tensor], inputs: Tensor,
              params: Sequence[Tensor] | None = None) -> Tensor:
    """J^T H_f J, with J the Jacobian of model(inputs) and H_f the loss Hessian in the output."""
    params = list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    out = model(inputs)
    flat_out = out.reshape(-1)
    J = torch.stack([
        _flat(torch.autograd.grad(flat_out[i], params, retain_graph=True, allow_unused=True), params)
        for i in range(flat_out.numel())
    ])
    f = out.detach().requires_grad_(True)
    loss = loss_of_output(f)
    (df,) = torch.autograd.grad(loss, f, create_graph=True)
    df = df.reshape(-1)
    Hf = torch.stack([torch.autograd.grad(df[i], f, retain_graph=True)[0].reshape(-1)
                      for i in range(df.numel())])
    G = (J.T @ Hf @ J).detach()
    return (G + G.T) / 2


def finite_difference_hvp(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any,
                          v: Tensor, eps: float = 1e-6) -> Tensor:
    """Central difference of the gradient along v (float64 models), with a fixed RNG."""
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_at(shift: float) -> Tensor:
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(v[offset: offset + p.numel()].view_as(p), alpha=shift)
                offset += p.numel()
        torch.manual_seed(0)
        g = _flat(torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True), params)
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(v[offset: offset + p.numel()].view_as(p), alpha=-shift)
                offset += p.numel()
        return g

    return (grad_at(eps) - grad_at(-eps)) / (2 * eps)


def eigvalsh(H: Tensor) -> Tensor:
    """Ascending eigenvalues, computed on one thread: MKL's threaded eigh takes seconds for a
    163×163 matrix on the two-core test machine, and milliseconds on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(H)
    finally:
        torch.set_num_threads(threads)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an estimate must leave untouched: state, modes, flags, grads, RNG streams."""
    import random

    import numpy as np

    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def assert_same_state(model: nn.Module, before: dict[str, Any]) -> None:
    """Assert ``model`` and the RNG streams are bit for bit as in ``before`` (a :func:`snapshot`)."""
    import numpy as np

    after = snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(a is b for a, b in zip(before["grads"], after["grads"]))
    for a, b in zip(before["grad_values"], after["grad_values"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["python_rng"] == after["python_rng"]
    assert np.array_equal(before["numpy_rng"], after["numpy_rng"])


def zoo_hessian(case: Any) -> Tensor:
    """Dense Hessian of a zoo case over its chosen parameters, with the engine's substitutions."""
    from lr_batch_callback.engine.differentiable import twice_differentiable
    from lr_batch_callback.engine.isolation import isolated

    with isolated(case.model), twice_differentiable():
        return dense_hessian(case.model, case.loss_fn, case.batch, case.chosen)


def zoo_ggn(case: Any) -> Tensor:
    """Dense GGN J^T H_f J of a zoo case: J row by row, H_f of the loss in the model output."""
    from lr_batch_callback.engine.differentiable import twice_differentiable
    from lr_batch_callback.engine.isolation import isolated

    params = case.chosen
    with isolated(case.model), twice_differentiable():
        out = case.output_fn(case.model, case.batch)
        flat_out = out.reshape(-1)
        J = torch.stack([
            _flat(torch.autograd.grad(flat_out[i], params, retain_graph=True, allow_unused=True),
                  params)
            for i in range(flat_out.numel())
        ])
        f = out.detach().requires_grad_(True)
        (df,) = torch.autograd.grad(case.loss_of_output(f), f, create_graph=True)
        df = df.reshape(-1)
        Hf = torch.stack([torch.autograd.grad(df[i], f, retain_graph=True)[0].reshape(-1)
                          for i in range(df.numel())])
    G = (J.T @ Hf @ J).detach()
    return (G + G.T) / 2
