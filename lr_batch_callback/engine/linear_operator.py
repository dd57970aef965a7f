"""``CurvatureOperator``: a symmetric linear operator on flat vectors, what every algorithm takes.

Vectors are rows: :meth:`CurvatureOperator.matmat` takes ``V`` of shape ``(k, dim)`` and returns
the ``k`` products as rows. Wrap any symmetric map with :meth:`CurvatureOperator.from_matrix` or
:meth:`CurvatureOperator.from_function`, or subclass and implement
:meth:`CurvatureOperator.local_matmat`; under ``torch.distributed`` the base class sums the
ranks' products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lr_batch_callback._checks import check_integer

__all__ = ["CurvatureOperator", "NonFiniteCurvatureError", "fresh_seed"]


class NonFiniteCurvatureError(FloatingPointError):
    """A loss or a curvature product was NaN or infinite."""


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


class CurvatureOperator:
    """A symmetric linear operator on flat vectors of length :attr:`dim`.

    Vectors are rows: :meth:`matmat` takes ``V`` of shape ``(k, dim)`` and returns the ``k``
    products as rows. Subclasses implement :meth:`local_matmat`; the base class checks shapes,
    counts products and, with ``distributed=True``, sums the local products over the ranks of the
    default process group (each rank's products being already weighted by its share).

    Args:
        dim: the number of entries of a vector (parameters).
        dtype: the dtype products are computed in.
        device: where vectors live.
        distributed: sum products over ranks (only when a process group is initialised).

    Attributes:
        num_products: products computed so far (a ``matmat`` of ``k`` rows counts ``k``).
        lower_bound: a known lower bound of the spectrum, or ``None`` (0 for a Gauss-Newton
            matrix of a loss convex in the outputs). Lanczos uses it to bound the error of the
            smallest eigenvalues, which a relative tolerance cannot reach at 0.
        symmetry_tolerance: the asymmetry (relative to the spectral radius) Lanczos accepts
            before it reports the operator unreliable; ``None``: rounding's ``10·sqrt(eps)``.
            Approximate products (finite differences) are symmetric only to their accuracy.
        asymmetry_causes: what to suspect when this operator is found asymmetric, or ``None``
            for the usual suspects (a wrong double backward, a loss that changes).

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0]))
        >>> op = CurvatureOperator.from_matrix(A)
        >>> op @ torch.tensor([1.0, 1.0])
        tensor([3., 1.])
    """

    def __init__(self, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", distributed: bool = False) -> None:
        self.dim = check_integer(dim, "dim")
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_products = 0
        self.distributed = bool(distributed) and _distributed_world() > 1
        self.lower_bound: float | None = None
        self.symmetry_tolerance: float | None = None
        self.asymmetry_causes: str | None = None

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_matrix(cls, matrix: Tensor) -> CurvatureOperator:
        """The operator of a dense symmetric ``(P, P)`` matrix (its symmetry is not checked)."""
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {tuple(matrix.shape)}.")
        return cls.from_function(lambda V: V @ matrix, matrix.shape[0], dtype=matrix.dtype,
                                 device=matrix.device)

    @classmethod
    def from_function(cls, matmat: Callable[[Tensor], Tensor], dim: int, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                      ) -> CurvatureOperator:
        """The operator whose products with the rows of ``V`` are ``matmat(V)`` (rows too)."""
        if not callable(matmat):
            raise TypeError(f"matmat must be callable V -> products, got {matmat!r}.")
        op = _FunctionOperator(dim, dtype=dtype, device=device)
        op._function = matmat
        return op

    # -- to be provided -------------------------------------------------------------------------
    def local_matmat(self, V: Tensor) -> Tensor:
        """Products with the rows of ``V`` on this process (implemented by subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} must implement local_matmat(V).")

    # -- public ---------------------------------------------------------------------------------
    def matvec(self, v: Tensor) -> Tensor:
        """The product with one flat vector ``v`` of length :attr:`dim`."""
        return self.matmat(v.reshape(1, -1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """Products with the rows of ``V`` (shape ``(k, dim)``), returned as rows."""
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ValueError(f"Expected vectors of shape (k, {self.dim}), got {tuple(V.shape)}.")
        V = V.to(device=self.device, dtype=self.dtype)
        if not self.distributed:
            out = self.local_matmat(V)
        else:
            error: Exception | None = None
            try:
                out = self.local_matmat(V)
            except Exception as exc:  # e.g. out of memory on this rank only
                # Enter the all-reduce anyway, with NaN: every rank then fails together below
                # instead of the others waiting for this one until the collective times out.
                error = exc
                out = torch.full_like(V, float("nan"))
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
            if error is not None:
                raise error
            # Tested after the reduction, which carries a NaN/inf from any rank to every rank.
            if out.device.type == "cpu" and not bool(torch.isfinite(out).all()):
                raise NonFiniteCurvatureError("A curvature product is not finite (NaN or inf).")
        self.num_products += V.shape[0]
        return out

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matmat(v.T).T

    def to_dense(self) -> Tensor:
        """The ``(dim, dim)`` matrix (``dim`` products: for small operators and tests)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def broadcast_(self, tensor: Tensor) -> Tensor:
        """Make ``tensor`` equal to rank 0's copy on every rank (a no-op without distribution)."""
        if self.distributed:
            dist.broadcast(tensor, src=0)
        return tensor


def fresh_seed(operator: CurvatureOperator) -> int:
    """A random seed drawn from the operating system; under distribution, rank 0's.

    It never comes from (and never advances) the global RNG streams.
    """
    seed = torch.tensor([torch.Generator().seed() % 2**62], dtype=torch.int64,
                        device=operator.device)
    return int(operator.broadcast_(seed).item())


class _FunctionOperator(CurvatureOperator):
    _function: Callable[[Tensor], Tensor]

    def local_matmat(self, V: Tensor) -> Tensor:
        return self._function(V)
