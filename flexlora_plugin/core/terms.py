"""One module's ``ΔW = Σ_j c_j B_j A_j``, kept in factored form, and the products the SVD needs.

Two layouts, one interface (:class:`ModuleTerms`):

* :class:`TermList` (CPU, or any device when the caller moved nothing): the clients' own
  factors, untouched; ΔW is accumulated one client at a time with ``addmm_`` (compute-bound,
  no copy of the factors).
* :class:`StackedTerms` (a CUDA device, built by :mod:`flexlora_plugin.core.staging`):
  ``B_cat = [B_1 | … | B_K] : (d_out, R)`` and ``A_cat = [A_1; …; A_K] : (R, d_in)`` resident
  on the device with the coefficients ``c : (R,)`` (``c_j`` repeated ``r_j`` times), so ΔW is one
  GEMM ``B_cat @ (c ⊙ A_cat)``.

``matmul(X) = ΔW X`` and ``rmatmul(Y) = ΔWᵀ Y`` never form ΔW: ``Σ_j c_j B_j (A_j X)``. With
``gram()`` (on a :class:`TermList`, built block by block from the factors) they let
:func:`~flexlora_plugin.core.projection.ritz_spectrum` extract the top triplets of a dense-path
module without any ``d_out × d_in`` matrix, and serve a rank above the first decomposition later.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .projection import Gram, Spectrum, factored_spectrum, gram_of, stacked_spectrum

__all__ = ["DenseTerms", "ModuleTerms", "StackedTerms", "TermList"]


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
    def gram(self, dtype: torch.dtype, device: torch.device | None) -> Gram:
        """The Gram matrix of the smaller side of ΔW, and ``‖ΔW‖_F²``."""

    @abstractmethod
    def matmul(self, X: Tensor) -> Tensor:
        """``ΔW @ X`` for ``X : (d_in, k)``, in ``X``'s dtype and device."""

    @abstractmethod
    def rmatmul(self, Y: Tensor) -> Tensor:
        """``ΔWᵀ @ Y`` for ``Y : (d_out, k)``, in ``Y``'s dtype and device."""

    @abstractmethod
    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        """All ``R`` singular triplets, exact, without forming ΔW (for ``R < min(d_out, d_in)``)."""

    @abstractmethod
    def factors(self, dtype: torch.dtype, device: torch.device | None) -> tuple[Tensor, Tensor]:
        """``(B_cat : (d_out, R), A_cat : (R, d_in))`` with ``B_cat A_cat = ΔW``: the terms side by side, ``c_j`` in B."""


_DELTA_K = 512  # TermList.delta: the inner size of one batched addmm


def _batches(items: list[tuple[float, Tensor, Tensor]], k: int) -> list[list[tuple[float, Tensor, Tensor]]]:
    """Consecutive ``items`` grouped so each group's ranks sum to at most ``k`` (a larger rank stays alone)."""
    out: list[list[tuple[float, Tensor, Tensor]]] = []
    size = 0
    for item in items:
        r = int(item[2].shape[0])
        if not out or size + r > k:
            out.append([])
            size = 0
        out[-1].append(item)
        size += r
    return out


@dataclass
class TermList(ModuleTerms):
    """The clients' factors as received: ``items[j] = (c_j, B_j, A_j)``."""

    items: list[tuple[float, Tensor, Tensor]]
    shape: tuple[int, int]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(int(A.shape[0]) for _, _, A in self.items)

    def delta(self, dtype: torch.dtype, device: torch.device | None, *, batch_k: int = _DELTA_K) -> Tensor:
        """``Σ_j c_j B_j A_j``, clients batched into GEMMs of inner size up to ``batch_k`` (default :data:`_DELTA_K`).

        One ``addmm_`` per client reads and writes the whole ``d_out × d_in`` output for every
        rank-8 client; stacking consecutive clients' ``B_j`` and ``c_j A_j`` first (at most
        ``(d_out + d_in) · 512`` floats at a time) reads and writes it once per batch instead.
        """
        out = torch.zeros(self.shape, dtype=dtype, device=device)
        for batch in _batches(self.items, batch_k):
            if len(batch) == 1:
                c, B, A = batch[0]
                out.addmm_(B.to(device=out.device, dtype=dtype), A.to(device=out.device, dtype=dtype), alpha=c)
                continue
            B_cat = torch.cat([B.to(device=out.device, dtype=dtype) for _, B, _ in batch], dim=1)
            A_cat = torch.cat([A.to(device=out.device, dtype=dtype) * c for c, _, A in batch], dim=0)
            out.addmm_(B_cat, A_cat)
        return out

    def gram(self, dtype: torch.dtype, device: torch.device | None, block_bytes: int = 2 << 20) -> Gram:
        """``ΔW ΔWᵀ`` or ``ΔWᵀ ΔW`` from slabs of ΔW, never ΔW itself.

        The slabs run along the larger side: ``ΔW[:, J] = Σ_j c_j B_j A_j[:, J]`` (wide) or
        ``ΔW[I, :] = Σ_j c_j B_j[I, :] A_j`` (tall), each ``n × b`` with ``n = min(d_out, d_in)``
        and at most ``block_bytes``; the FLOPs are those of ΔW and its Gram, the memory is the
        Gram plus one slab. ``‖ΔW‖_F²`` is the trace of the Gram, summed in float64 (a float64
        norm per slab would allocate a float64 copy of it each time).
        """
        d_out, d_in = self.shape
        wide = d_out <= d_in
        n, m = (d_out, d_in) if wide else (d_in, d_out)
        on = torch.device(device) if device is not None else torch.device("cpu")
        b = max(1, min(m, block_bytes // (n * torch.empty((), dtype=dtype).element_size())))
        G = torch.zeros(n, n, dtype=dtype, device=on)
        slab = torch.empty(n, b, dtype=dtype, device=on)  # wide: ΔW[:, J]; tall: ΔW[I, :]ᵀ
        for lo in range(0, m, b):
            cur = slab[:, : min(b, m - lo)]
            cur.zero_()
            for c, B, A in self.items:
                if wide:
                    cur.addmm_(B.to(device=on, dtype=dtype), A[:, lo : lo + b].to(device=on, dtype=dtype), alpha=c)
                else:
                    cur.addmm_(A.T.to(device=on, dtype=dtype), B[lo : lo + b].T.to(device=on, dtype=dtype), alpha=c)
            G.addmm_(cur, cur.T)
        del slab, cur
        total = float(G.diagonal().sum(dtype=torch.float64))
        return Gram(matrix=G, wide=wide, shape=self.shape, total_energy=total)

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

    def factors(self, dtype: torch.dtype, device: torch.device | None) -> tuple[Tensor, Tensor]:
        B_cat = torch.cat([B.to(device=device, dtype=dtype) * c for c, B, _ in self.items], dim=1)
        return B_cat, torch.cat([A.to(device=device, dtype=dtype) for _, _, A in self.items], dim=0)

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

    def gram(self, dtype: torch.dtype, device: torch.device | None) -> Gram:
        """From the dense ΔW: on the device one GEMM is faster than slabs, and memory is not the limit."""
        return gram_of(self.delta(dtype, device))

    def matmul(self, X: Tensor) -> Tensor:
        dev = X.to(device=self.A_cat.device)
        return (self.B_cat.to(dev.dtype) @ (self.coef.to(dev.dtype)[:, None] * (self.A_cat.to(dev.dtype) @ dev))).to(X.device)

    def rmatmul(self, Y: Tensor) -> Tensor:
        dev = Y.to(device=self.B_cat.device)
        return (self.A_cat.to(dev.dtype).T @ (self.coef.to(dev.dtype)[:, None] * (self.B_cat.to(dev.dtype).T @ dev))).to(Y.device)

    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        return stacked_spectrum(self.B_cat.to(dtype) * self.coef.to(dtype)[None, :], self.A_cat.to(dtype))

    def factors(self, dtype: torch.dtype, device: torch.device | None) -> tuple[Tensor, Tensor]:
        B_cat = self.B_cat.to(dtype) * self.coef.to(dtype)[None, :]
        return B_cat.to(device or B_cat.device), self.A_cat.to(dtype).to(device or B_cat.device)


@dataclass
class DenseTerms(ModuleTerms):
    """A matrix held dense, ``ΔW = matrix``: the same interface, for a sum whose stacked rank reached ``min(d_out, d_in)``."""

    matrix: Tensor
    shape: tuple[int, int]

    @property
    def ranks(self) -> tuple[int, ...]:
        return (min(self.shape),)  # never below min(d_out, d_in): the dense path

    def delta(self, dtype: torch.dtype, device: torch.device | None) -> Tensor:
        return self.matrix.to(device=device or self.matrix.device, dtype=dtype)

    def gram(self, dtype: torch.dtype, device: torch.device | None) -> Gram:
        return gram_of(self.delta(dtype, device))

    def matmul(self, X: Tensor) -> Tensor:
        return self.matrix.to(X) @ X

    def rmatmul(self, Y: Tensor) -> Tensor:
        return self.matrix.to(Y).T @ Y

    def factored_spectrum(self, dtype: torch.dtype, device: torch.device | None) -> Spectrum:
        raise ValueError("a dense matrix has no factored spectrum")

    def factors(self, dtype: torch.dtype, device: torch.device | None) -> tuple[Tensor, Tensor]:
        raise ValueError("a dense matrix is not held as factors")
