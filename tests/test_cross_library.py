"""Cross-library check: our Hessian and GGN products equal curvlinops' on models it supports
(no BatchNorm in train mode, no SiLU or GroupNorm: its GGN needs forward-mode AD), and so do the top eigenvalues."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lr_batch_callback import GGNOperator, HessianOperator, lanczos

curvlinops = pytest.importorskip("curvlinops")


def _problem(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        x = torch.randn(12, 5, dtype=torch.float64)
    else:  # curvlinops' GGN uses forward-mode AD, which SiLU and GroupNorm lack
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(4 * 2 * 2, 3)).double()
        x = torch.randn(6, 1, 7, 7, dtype=torch.float64)
    y = torch.arange(x.shape[0]) % 3
    return model, x, y


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_products_and_top_eigenvalue_equal_curvlinops(name: str, curvature: str) -> None:
    model, x, y = _problem(name)
    params = [p for p in model.parameters() if p.requires_grad]
    peer_class = (curvlinops.HessianLinearOperator if curvature == "hessian"
                  else curvlinops.GGNLinearOperator)
    peer = peer_class(model, nn.CrossEntropyLoss(), params, [(x, y)])
    ours_class = HessianOperator if curvature == "hessian" else GGNOperator
    ours = ours_class(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), [(x, y)])
    V = torch.randn(3, ours.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([peer @ v for v in V])
    torch.testing.assert_close(ours.matmat(V), expected, rtol=1e-9, atol=1e-11)
    dense = torch.stack([peer @ e for e in torch.eye(ours.dim, dtype=torch.float64)])
    top = torch.linalg.eigvalsh((dense + dense.T) / 2)[-1]
    assert lanczos(ours, tol=1e-10, seed=0).eigenvalues[0].item() == pytest.approx(top.item(),
                                                                                  rel=1e-8)
