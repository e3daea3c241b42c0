"""One module's ``ΔW = Σ_j c_j B_j A_j``, kept in factored form, and the products the SVD needs.

Two layouts, one interface (:class:`ModuleTerms`):

* :class:`TermList` (CPU, or any device when the caller moved nothing): the clients' own
  factors, untouched; ΔW is accumulated one client at a time with ``addmm_`` (compute-bound,
  no copy of the factors).
* :class:`StackedTerms` (a CUDA device, built by :mod:`flexlora_plugin.core.staging`):
  ``B_cat = [B_1 | … | B_K] : (d_out, R)`` and ``A_cat = [A_1; …; A_K] : (R, d_in)`` resident
  on the device with the coefficients ``c : (R,)`` (``c_j`` repeated ``r_j`` times), so ΔW is one
  GEMM ``B_cat @ (c ⊙ A_cat)``.

``matmul(X) = ΔW X`` and ``rmatmul(Y) = ΔWᵀ Y`` never form ΔW: ``Σ_j c_j B_j (A_j X)``. They serve
:func:`~flexlora_plugin.core.projection.ritz_spectrum` when a rank above the first decomposition
is requested later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .projection import Spectrum, factored_spectrum, stacked_spectrum

__all__ = ["ModuleTerms", "StackedTerms", "TermList"]


class ModuleTerms(ABC):
    """``ΔW = Σ_j c_j B_j A_j`` of one module, ``B_j : (d_out, r_j)``, ``A_j : (r_j, d_in)``."""

    shape: tuple[int, int]

    @property
    @abstractmethod
    def ranks(self) -> tuple[int, ...]:
        """``r_j`` per client, in order."""

    @property
    def stacked_rank(self) -> int:
        """``R = Σ_j r_j``."""
        return sum(self.ranks)

    @abstractmethod
    def delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        """Dense ``ΔW : (d_out, d_in)``."""

    @abstractmethod
    def matmul(self, X: Tensor) -> Tensor:
        """``ΔW @ X`` for ``X : (d_in, k)``, in ``X``'s dtype and device."""

    @abstractmethod
    def rmatmul(self, Y: Tensor) -> Tensor:
        """``ΔWᵀ @ Y`` for ``Y : (d_out, k)``, in ``Y``'s dtype and device."""

    @abstractmethod
    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        """All ``R`` singular triplets, exact, without forming ΔW (for ``R < min(d_out, d_in)``)."""


@dataclass
class TermList(ModuleTerms):
    """The clients' factors as received: ``items[j] = (c_j, B_j, A_j)``."""

    items: list[tuple[float, Tensor, Tensor]]
    shape: tuple[int, int]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(A.shape[0]) for _, _, A in self.items)

    def delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        for c, B, A in self.items:
            out.addmm_(B.to(device=out.device, dtype=dtype), A.to(device=out.device, dtype=dtype), alpha=c)
        return out

    def matmul(self, X: Tensor) -> Tensor:
        out = X.new_zeros(self.shape[0], X.shape[1])
        for c, B, A in self.items:
            out.addmm_(B.to(X), A.to(X) @ X, alpha=c)
        return out

    def rmatmul(self, Y: Tensor) -> Tensor:
        out = Y.new_zeros(self.shape[1], Y.shape[1])
        for c, B, A in self.items:
            out.addmm_(A.to(Y).T, B.to(Y).T @ Y, alpha=c)
        return out

    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        Bs = [B.to(device=device, dtype=dtype) for _, B, _ in self.items]
        As = [A.to(device=device, dtype=dtype) for _, _, A in self.items]
        return factored_spectrum(Bs, As, [c for c, _, _ in self.items])


@dataclass
class StackedTerms(ModuleTerms):
    """The clients' factors stacked on one device: ``ΔW = B_cat @ (coef[:, None] * A_cat)``.

    Attributes
    ----------
    B_cat : Tensor, shape (d_out, R)
    A_cat : Tensor, shape (R, d_in)
    coef : Tensor, shape (R,)
        ``c_j`` repeated over client ``j``'s ``r_j`` rows, float64.
    rank_list : tuple[int, ...]
        ``r_j`` per client.
    """

    B_cat: Tensor
    A_cat: Tensor
    coef: Tensor
    rank_list: tuple[int, ...]
    shape: tuple[int, int]

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.rank_list

    def _scaled_A(self, dtype: torch.dtype) -> Tensor:
        return self.A_cat.to(dtype) * self.coef.to(dtype)[:, None]

    def delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return (self.B_cat.to(dtype) @ self._scaled_A(dtype)).to(device or self.B_cat.device)

    def matmul(self, X: Tensor) -> Tensor:
        dev = X.to(device=self.A_cat.device)
        return (self.B_cat.to(dev.dtype) @ (self.coef.to(dev.dtype)[:, None] * (self.A_cat.to(dev.dtype) @ dev))).to(X.device)

    def rmatmul(self, Y: Tensor) -> Tensor:
        dev = Y.to(device=self.B_cat.device)
        return (self.A_cat.to(dev.dtype).T @ (self.coef.to(dev.dtype)[:, None] * (self.B_cat.to(dev.dtype).T @ dev))).to(Y.device)

    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        return stacked_spectrum(self.B_cat.to(dtype) * self.coef.to(dtype)[None, :], self.A_cat.to(dtype))
