"""The linear-algebra engine behind every method: one round's validated replies and exact low-rank sums.

A method's rule (:mod:`flexlora_plugin.core.methods`) sees two names from here:

* :class:`Round`: what :func:`~flexlora_plugin.core.aggregate` hands a method's ``from_round``:
  the validated clients (:class:`~flexlora_plugin.core.validation.ClientUpdate`: factors, weight,
  per-module scaling ``s_k``), the module infos, the exclusions, the options, each module's
  normalised weights ``p_k`` (:meth:`Round.weights`) and the exact sum
  ``Σ_k c_k B_k A_k`` of the replies for any coefficients ``c_k`` (:meth:`Round.weighted_sum`).
* :class:`LowRankSum`: one module's ``ΔW = Σ_j c_j B_j A_j`` kept factored, with its leading
  singular triplets on demand (:meth:`LowRankSum.spectrum`), its dense form
  (:meth:`LowRankSum.delta`) and the matrix products that never form it.

Everything else is placement, chosen here and nowhere in a method: whether the clients' own
tensors are used (CPU) or stacked on a device (CUDA, :mod:`~flexlora_plugin.core.staging`);
the exact factored SVD when the stacked rank ``R = Σ r_k`` is below ``min(d_out, d_in)``; else a
top-``k`` solve (the Gram matrix from slabs with no dense ΔW on the CPU, the filtered solver of
:mod:`~flexlora_plugin.core.topk` on a device) refined by a Rayleigh–Ritz step. Every path is
exact to the compute dtype. :class:`EngineStats` counts the work, per module, for tests and
benchmarks to read.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from .errors import RankError
from .projection import (
    Gram,
    GramBasis,
    Spectrum,
    dense_spectrum,
    gram_basis,
    gram_of,
    gram_path,
    module_seed,
    ritz_spectrum,
)
from .terms import DenseTerms, ModuleTerms, StackedTerms, TermList
from .topk import filtered_spectrum
from .validation import ClientUpdate, ModuleInfo

__all__ = ["AggregateOptions", "EngineStats", "LowRankSum", "ProgressFn", "Round", "ieee_float32", "trim_heap"]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class AggregateOptions:
    """The settings of one :func:`~flexlora_plugin.core.aggregate` call a method may read.

    ``max_rank``: the largest rank that will be requested (FlexLoRA decomposes once for it), or a
    method's padded rank (HetLoRA). ``seed``: the run seed. ``progress``: called after each
    module's spectrum.
    """

    max_rank: int | None = None
    hetlora_weighting: Literal["data", "norm"] = "data"
    compute_dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    seed: int = 0
    progress: ProgressFn | None = None


@dataclass
class EngineStats:
    """Work done for one update, per module: what tests and benchmarks count.

    Attributes
    ----------
    deltas : Counter[str]
        Dense ``d_out × d_in`` ΔW formed.
    slab_grams : Counter[str]
        Gram matrices built slab by slab from the factors (no dense ΔW).
    decompositions : Counter[str]
        Eigen- or singular-value decompositions of a Gram matrix or a dense ΔW.
    solves : list[tuple[str, int, bool]]
        Filtered top-``k`` solves on a device: ``(module, k, certified)``.
    staged : Counter[str]
        Spectra computed while the factors were still being staged on the device.
    views : Counter[str]
        Per-client views made into a module's staged stack (for a method that reads each client's factors).
    """

    deltas: Counter[str] = field(default_factory=Counter)
    slab_grams: Counter[str] = field(default_factory=Counter)
    decompositions: Counter[str] = field(default_factory=Counter)
    solves: list[tuple[str, int, bool]] = field(default_factory=list)
    staged: Counter[str] = field(default_factory=Counter)
    views: Counter[str] = field(default_factory=Counter)


class LowRankSum:
    """``ΔW = Σ_j c_j B_j A_j`` of one module, ``B_j : (d_out, r_j)``, ``A_j : (r_j, d_in)``, kept factored.

    Spectra are computed lazily and cached: the first request decomposes for
    ``max(k, max_rank)`` triplets (without ``max_rank``: the largest ``r_j``), and without
    ``max_rank`` the dense path keeps its Gram eigenbasis (CPU) or Gram matrix (device), so a
    later, larger ``k`` costs one Rayleigh–Ritz step on the factors, never another ΔW. A sum
    restored from a server state (:meth:`restored`) answers from its stored triplets only.

    Parameters
    ----------
    module : str
        Names errors; seeds the device solver's start.
    terms : ModuleTerms or None
        The terms (None for a restored sum).
    shape : tuple[int, int]
        ``(d_out, d_in)``.
    """

    def __init__(
        self,
        module: str,
        terms: ModuleTerms | None,
        shape: tuple[int, int],
        *,
        max_rank: int | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        stats: EngineStats | None = None,
        on_spectrum: Callable[[str], None] | None = None,
    ) -> None:
        self.module, self.terms, self.shape = module, terms, (int(shape[0]), int(shape[1]))
        self.max_rank, self.compute_dtype, self.seed = max_rank, compute_dtype, seed
        self.device = torch.device(device) if device is not None else None
        self.stats = stats if stats is not None else EngineStats()
        self.on_spectrum = on_spectrum
        self.cached: Spectrum | None = None
        self._basis: GramBasis | None = None  # CPU dense path without max_rank: for later, larger ranks
        self._gram: Gram | None = None  # device dense path without max_rank: the same

    @classmethod
    def restored(cls, module: str, spectrum: Spectrum, shape: tuple[int, int], *, seed: int = 0) -> LowRankSum:
        """A sum known only by its stored leading triplets (a server state)."""
        out = cls(module, None, shape, compute_dtype=spectrum.US.dtype, seed=seed)
        out.cached = spectrum
        return out

    @classmethod
    def of_factors(cls, module: str, B: Tensor, A: Tensor, **kwargs: Any) -> LowRankSum:
        """``ΔW = B A`` for ``B : (d_out, R)``, ``A : (R, d_in)`` (one term, coefficient 1)."""
        return cls(
            module, TermList([(1.0, B, A)], (int(B.shape[0]), int(A.shape[1]))), (int(B.shape[0]), int(A.shape[1])), **kwargs
        )

    @classmethod
    def of_matrix(cls, module: str, matrix: Tensor, **kwargs: Any) -> LowRankSum:
        """``ΔW = matrix``, held dense."""
        shape = (int(matrix.shape[0]), int(matrix.shape[1]))
        return cls(module, DenseTerms(matrix, shape), shape, **kwargs)

    def stacked(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(B_cat : (d_out, R), A_cat : (R, d_in))`` with ``B_cat A_cat = ΔW`` exactly: the terms side by side."""
        return self._live().factors(dtype or self.compute_dtype, self.device)

    @property
    def ranks(self) -> tuple[int, ...]:
        """``r_j`` per term (empty for a restored sum)."""
        return self.terms.ranks if self.terms is not None else ()

    @property
    def stacked_rank(self) -> int:
        """``R = Σ_j r_j`` (0 for a restored sum)."""
        return sum(self.ranks)

    @property
    def factored(self) -> bool:
        """True when ``R < min(d_out, d_in)``: the exact SVD without a dense ΔW."""
        return 0 < self.stacked_rank < min(self.shape)

    def delta(self, dtype: torch.dtype | None = None) -> Tensor:
        """Dense ``ΔW : (d_out, d_in)`` (compute dtype by default)."""
        dtype = dtype or self.compute_dtype
        if self.terms is None:
            spec = self.cached
            if spec is None or not spec.complete:
                held = spec.k if spec is not None else 0
                raise RankError(f"module {self.module}: restored update holds only its top {held} triplets; ΔW is not available")
            return (spec.us() @ spec.Vh).to(dtype)
        self.stats.deltas[self.module] += 1
        return self.terms.delta(dtype, self.device)

    def matmul(self, X: Tensor) -> Tensor:
        """``ΔW @ X`` for ``X : (d_in, k)`` without forming ΔW."""
        return self._live().matmul(X)

    def rmatmul(self, Y: Tensor) -> Tensor:
        """``ΔWᵀ @ Y`` for ``Y : (d_out, k)`` without forming ΔW."""
        return self._live().rmatmul(Y)

    def _live(self) -> ModuleTerms:
        if self.terms is None:
            raise RankError(f"module {self.module}: a restored update holds triplets, not the clients' factors")
        return self.terms

    def exact_spectrum(self) -> Spectrum:
        """All singular triplets, computed in float64 and not cached (export); a restored sum answers its own."""
        if self.terms is None:
            return self.spectrum(1)
        if self.factored:
            return self.terms.factored_spectrum(torch.float64, self.device)
        self.stats.decompositions[self.module] += 1
        return dense_spectrum(self.delta(torch.float64), min(self.shape))  # type: ignore[return-value]

    def spectrum(self, k: int) -> Spectrum:
        """Leading singular triplets, at least ``min(k, rank)`` of them; computed in IEEE float32 (no TF32)."""
        with ieee_float32():
            return self._spectrum(k)

    def keep_sharing(self, B: Tensor, scaling: float) -> None:
        """Hold ``B = U_k S_k / s`` in place of the cached ``U_k S_k`` (one ``d_out × k`` matrix kept, not two)."""
        spec = self.cached
        if spec is not None and B.shape == spec.US.shape and B is not spec.US and B.dtype == spec.US.dtype:
            self.cached = spec.sharing(B, scaling)

    def _spectrum(self, k: int) -> Spectrum:
        cached = self.cached
        if cached is not None and (cached.complete or cached.k >= k):
            return cached
        if self.terms is None:
            held = cached.k if cached else 0
            raise RankError(f"module {self.module}: restored update holds {held} triplets, rank {k} was requested")
        spec = self._compute(k, self.terms)
        if cached is not None:
            logger.debug("module %s: spectrum extended from %d to %d triplets", self.module, cached.k, spec.k)
        self.cached = spec
        if self.on_spectrum is not None:
            self.on_spectrum(self.module)
        return spec

    def _compute(self, k: int, terms: ModuleTerms) -> Spectrum:
        n = min(self.shape)
        target = min(max(k, self.max_rank or max(terms.ranks)), n)
        if self.factored:  # complete: a saved state can rebuild ΔW
            return terms.factored_spectrum(self.compute_dtype, self.device)
        if self._basis is not None:  # a rank above the first decomposition's: one Ritz step on the factors
            return ritz_spectrum(self._basis, k, terms.matmul, terms.rmatmul)
        if isinstance(terms, StackedTerms):  # on a device: one GEMM for ΔW, an iterative top-k solve
            return self._stacked(terms, target)
        self.stats.decompositions[self.module] += 1
        if self.max_rank is None:  # keep the whole Gram eigenbasis for later, larger ranks
            spec, basis = dense_spectrum(self.delta(), target, keep_basis=True)  # type: ignore[misc]
            if basis is not None and not spec.complete:
                self._basis = basis
            return spec  # type: ignore[no-any-return]
        if isinstance(terms, TermList) and gram_path(target, self.shape):  # no ΔW: Gram from slabs, top-k eigenvectors
            return self._from_slabs(terms, target)
        return dense_spectrum(self.delta(), target)  # type: ignore[return-value]

    def _from_slabs(self, terms: TermList, k: int) -> Spectrum:
        self.stats.slab_grams[self.module] += 1
        basis = gram_basis(terms.gram(self.compute_dtype, self.device), k)
        spec = ritz_spectrum(basis, k, terms.matmul, terms.rmatmul)
        del basis
        trim_heap()
        return spec

    def _stacked(self, terms: StackedTerms, k: int) -> Spectrum:
        """Top-``k`` triplets of a stacked sum: ΔW in one GEMM, its Gram, the certified filtered solver.

        Without ``max_rank`` the Gram matrix is kept (``n²`` floats on the device), so a later,
        larger rank costs one more solve on it and products with the factors, never another ΔW.
        Falls back to every eigenvector of the Gram matrix when the solver is not worthwhile or
        not certified.
        """
        gram, self._gram = self._gram, None
        delta = None
        if gram is None:
            delta = self.delta()
            if not gram_path(k, self.shape):
                self.stats.decompositions[self.module] += 1
                return dense_spectrum(delta, k)  # type: ignore[return-value]
            gram = gram_of(delta)
        if delta is not None:
            matmul, rmatmul = (lambda X: delta @ X), (lambda Y: delta.T @ Y)
        else:
            matmul, rmatmul = terms.matmul, terms.rmatmul
        spec = None
        if gram_path(k, self.shape):
            spec = filtered_spectrum(gram, k, matmul, rmatmul, seed=module_seed(self.seed, self.module, k))
            self.stats.solves.append((self.module, k, spec is not None))
        if spec is None:  # not worthwhile, or not certified: every eigenvector of the Gram matrix
            self.stats.decompositions[self.module] += 1
            spec = ritz_spectrum(gram_basis(dataclasses.replace(gram, matrix=gram.matrix.clone()), k), k, matmul, rmatmul)
        if self.max_rank is None:
            self._gram = gram
        return spec


class Round:
    """One round's validated replies, as a method's ``from_round`` reads them.

    Attributes
    ----------
    info : Mapping[str, ModuleInfo]
        The modules some kept client holds, with the server's shapes.
    excluded : Mapping[Hashable, str]
        Clients left out of this round, with the reason.
    options : AggregateOptions
    stats : EngineStats
        The work done for this round (shared by the update built from it).
    previous : GlobalUpdate or None
        The federation's global update before this round (None in round 1), for a method whose
        update accumulates over rounds.
    """

    def __init__(
        self,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
        *,
        terms: Callable[[str, Mapping[Hashable, float]], ModuleTerms] | None = None,
        prepared: Mapping[str, tuple[Mapping[Hashable, float], LowRankSum]] | None = None,
        stats: EngineStats | None = None,
        placed: Callable[[], Sequence[ClientUpdate]] | None = None,
        previous: Any = None,
    ) -> None:
        self.previous = previous  # the federation's global update before this round (a method that accumulates reads it)
        self._kept = list(clients)  # weights and scalings; factors as received
        self._placed = placed  # the same clients, factors on the compute device (built on first access)
        self._clients: Sequence[ClientUpdate] | None = None if placed is not None else self._kept
        self.info = dict(info)
        self.excluded = dict(excluded)
        self.options = options
        self.stats = stats if stats is not None else EngineStats()
        self._terms = terms
        self._prepared = dict(prepared or {})
        self._spectra_done: set[str] = set()

    @property
    def ids(self) -> tuple[Hashable, ...]:
        """The kept clients' ids, in order."""
        return tuple(c.client for c in self._kept)

    @property
    def clients(self) -> Sequence[ClientUpdate]:
        """The kept clients, their factors on the compute device."""
        if self._clients is None:
            self._clients = self._placed() if self._placed is not None else self._kept
        return self._clients

    def weights(self, module: str) -> dict[Hashable, float]:
        """``p_k`` of every kept client holding ``module``: its weight renormalised over those clients."""
        held = [c for c in self._kept if module in c.factors]
        top = max(c.weight for c in held)  # divided by the largest first: the sum is >= 1, never 0 or inf
        total = sum(c.weight / top for c in held)
        return {c.client: (c.weight / top) / total for c in held}

    def scalings(self, module: str) -> dict[Hashable, float]:
        """``s_k`` of every kept client holding ``module``."""
        return {c.client: c.scalings[module] for c in self._kept if module in c.factors}

    def weighted_sum(self, module: str, coefficients: Mapping[Hashable, float]) -> LowRankSum:
        """``Σ_k c_k B_k A_k`` of ``module`` over the clients in ``coefficients``, kept factored.

        ``coefficients``: client -> ``c_k`` (e.g. ``p_k s_k``); clients not listed are left out.
        """
        info = self.info[module]
        o = self.options
        prepared = self._prepared.pop(module, None)
        if prepared is not None and _same(prepared[0], coefficients):  # decomposed while staging, for these c_k
            summed = prepared[1]
            summed.on_spectrum = self.spectrum_done
            if summed.cached is not None:
                self.spectrum_done(module)
            return summed
        if self._terms is not None:
            terms = self._terms(module, coefficients)
        else:
            held = [
                (coefficients[c.client], c.factors[module].B, c.factors[module].A)
                for c in self.clients
                if c.client in coefficients
            ]
            terms = TermList(held, info.shape)
        return LowRankSum(
            module,
            terms,
            info.shape,
            max_rank=o.max_rank,
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
            stats=self.stats,
            on_spectrum=self.spectrum_done,
        )

    def spectrum_done(self, module: str) -> None:
        """Report progress: ``options.progress(done, total, module)`` the first time a module's spectrum is ready."""
        if module in self._spectra_done:
            return
        self._spectra_done.add(module)
        if self.options.progress is not None:
            self.options.progress(len(self._spectra_done), len(self.info), module)


def _same(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> bool:
    """The same clients with the same coefficients, up to rounding (weights are rescaled after the checks)."""
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-12 * abs(b[k]) for k in b)


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run float32 matmuls in full IEEE precision inside; the caller's setting is restored on exit.

    No TF32 on Ampere+ GPUs, whatever the caller set with ``torch.set_float32_matmul_precision``.
    """
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


_MALLOC_TRIM: Callable[[int], int] | None | bool = False  # False: not looked up yet; None: not glibc


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim(0)``); a no-op without glibc.

    Between dense-path modules the small, long-lived factors a module keeps sit among the freed
    Gram, slab and Rayleigh–Ritz blocks of the previous ones, and glibc keeps those pages
    resident: without the trim the server's extra peak memory grows with every module.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is False:
        import ctypes
        import ctypes.util

        try:
            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):  # musl, macOS, Windows
            _MALLOC_TRIM = None
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)  # type: ignore[operator]
