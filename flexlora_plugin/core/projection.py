"""Truncated SVD of a module's ΔW and its redistribution to a client of rank ``r``.

Two exact ways to obtain the leading singular triplets of ``ΔW = Σ_k c_k B_k A_k``
(``c_k = p_k s_k``, ``B_k : (d_out, r_k)``, ``A_k : (r_k, d_in)``, stacked rank ``R = Σ r_k``):

* **factored** (``R < min(d_out, d_in)``): with ``B_cat = [c_1 B_1 | … | c_K B_K] : (d_out, R)``
  and ``A_cat = [A_1; …; A_K] : (R, d_in)``, take ``B_cat = Q_b R_b`` and ``A_catᵀ = Q_a R_a``.
  Then ``ΔW = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the ``R × R`` core ``= U_c S V_cᵀ`` gives
  ``U = Q_b U_c`` and ``Vᵀ = V_cᵀ Q_aᵀ``. No ``d_out × d_in`` matrix is ever formed.
* **dense** (otherwise): only the top ``k`` triplets are extracted: the leading eigenvectors of
  the Gram matrix of the smaller side (:class:`Gram`), refined by one Rayleigh–Ritz step (an SVD
  of ``ΔW V`` or ``Uᵀ ΔW``), which restores full float32 accuracy. The Gram matrix comes from a
  dense ΔW (:func:`gram_of`) or, without ever forming ΔW, block by block from the factors
  (:meth:`~flexlora_plugin.core.terms.ModuleTerms.gram`); on the CPU only its top ``k``
  eigenvectors are computed (LAPACK ``syevr``, in place, :func:`gram_basis`).

Redistribution (the paper's rule, with B absorbing S): a client of rank ``r`` and scaling ``s``
receives ``B = U_r S_r / s`` and ``A = V_rᵀ``, so that ``s · B · A`` is the best rank-``r``
approximation of ΔW (Eckart–Young). Directions beyond the numerical rank of ΔW (round 0, where
ΔW = 0, or fewer directions than ``r``) get a zero B column and a random A row orthogonal to
the kept rows, drawn like peft's Kaiming-uniform init, so those directions can still learn.

Dtype policy: compute in float32 (float64 on request), return in the adapter's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import RankError

__all__ = [
    "Gram",
    "GramBasis",
    "Spectrum",
    "dense_spectrum",
    "factored_spectrum",
    "frobenius2",
    "gram_basis",
    "gram_of",
    "gram_path",
    "module_seed",
    "redistribute",
    "ritz_spectrum",
    "stacked_spectrum",
]

logger = logging.getLogger(__name__)

# Above this share of min(d_out, d_in), a full SVD is cheaper than Gram + Rayleigh–Ritz.
_FULL_SVD_SHARE = 0.4


@dataclass(frozen=True)
class Spectrum:
    """The leading singular triplets of one module's ΔW, in factored form.

    Attributes
    ----------
    US : Tensor, shape (d_out, k)
        ``U_k · diag(S_k) / us_scale``. Read it through :meth:`us` and :meth:`b_factor`.
    S : Tensor, shape (k,)
        Singular values, descending.
    Vh : Tensor, shape (k, d_in)
        ``V_kᵀ``, orthonormal rows.
    total_energy : float
        ``‖ΔW‖_F² = Σ_i σ_i²`` over the *whole* spectrum, for the energy-kept ratio.
    complete : bool
        True when ``k`` covers every non-zero singular value, so any rank can be served.
    us_scale : float
        1, or the scaling ``s`` of a receiver whose ``B = U_k S_k / s`` this spectrum shares
        (:meth:`sharing`), so that a server keeps one ``d_out × k`` matrix per module, not two.
    """

    US: Tensor
    S: Tensor
    Vh: Tensor
    total_energy: float
    complete: bool
    us_scale: float = 1.0

    def us(self) -> Tensor:
        """``U_k · diag(S_k)``; a new tensor when ``us_scale ≠ 1``."""
        return self.US if self.us_scale == 1.0 else self.US * self.us_scale

    def b_factor(self, r: int, scaling: float) -> Tensor:
        """``B = U_r S_r / scaling : (d_out, r)``; the stored tensor itself when it is that already."""
        if r == self.k and scaling == self.us_scale:
            return self.US
        if self.us_scale == 1.0:
            return self.US[:, :r] / scaling
        return self.US[:, :r] * (self.us_scale / scaling)

    def sharing(self, B: Tensor, scaling: float) -> Spectrum:
        """A copy holding ``B = b_factor(k, scaling)`` in place of its own ``US``, which is then freed."""
        if tuple(B.shape) != tuple(self.US.shape) or B.dtype != self.US.dtype or B.device != self.US.device:
            raise ValueError(f"B {tuple(B.shape)} {B.dtype} cannot stand for US {tuple(self.US.shape)} {self.US.dtype}")
        return dataclasses.replace(self, US=B, us_scale=float(scaling))

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    def numerical_rank(self) -> int:
        """Number of singular values above ``max(d_out, d_in) · eps · σ_1`` (as ``matrix_rank``).

        Computed once per spectrum: one device sync, however many ranks are served from it.
        """
        return self._numerical_rank

    @functools.cached_property
    def _numerical_rank(self) -> int:
        S = self.S.cpu()  # one device sync, not two
        if self.k == 0 or float(S[0]) == 0.0:
            return 0
        eps = torch.finfo(S.dtype).eps
        tol = max(self.US.shape[0], self.Vh.shape[1]) * eps * float(S[0])
        return int((S > tol).sum())

    def rank_at(self, tol: float) -> int:
        """Smallest ``r ≥ 1`` with ``Σ_{i≥r} σ_i² ≤ tol² · ‖ΔW‖_F²`` (``‖ΔW − [ΔW]_r‖_F ≤ tol · ‖ΔW‖_F``)."""
        tail = (self.S.double() ** 2).flip(0).cumsum(0).flip(0)  # tail[i] = Σ_{j≥i} σ_j²
        ok = (tail <= (tol**2) * self.total_energy).nonzero()
        return max(1, int(ok[0]) if len(ok) else self.k)

    def energy_kept(self, r: int) -> float:
        """``Σ_{i<r} σ_i² / Σ_i σ_i²``; 1.0 for ΔW = 0."""
        if self.total_energy == 0.0:
            return 1.0
        kept = float((self.S[:r].double() ** 2).sum())
        return min(1.0, kept / self.total_energy)


def factored_spectrum(Bs: list[Tensor], As: list[Tensor], coefs: list[float]) -> Spectrum:
    """Exact SVD of ``Σ_k coefs[k] · Bs[k] @ As[k]`` without forming it.

    Parameters
    ----------
    Bs : list of Tensor, each shape (d_out, r_k)
    As : list of Tensor, each shape (r_k, d_in)
    coefs : list of float
        ``c_k = p_k · s_k``.

    Returns
    -------
    Spectrum
        Complete (all ``R`` triplets), in the dtype of the inputs.
    """
    B_cat = torch.cat([c * B for c, B in zip(coefs, Bs, strict=True)], dim=1)
    return stacked_spectrum(B_cat, torch.cat(As, dim=0))


def stacked_spectrum(B_cat: Tensor, A_cat: Tensor) -> Spectrum:
    """Exact SVD of ``B_cat @ A_cat``: two thin QRs and the SVD of an ``R × R`` core (module notes).

    ``B_cat : (d_out, R)`` has the coefficients folded in; ``A_cat : (R, d_in)``.
    """
    Q_b, R_b = torch.linalg.qr(B_cat)
    Q_a, R_a = torch.linalg.qr(A_cat.T)
    U_c, S, Vh_c = torch.linalg.svd(R_b @ R_a.T)
    US = (Q_b @ U_c) * S
    Vh = Vh_c @ Q_a.T
    return Spectrum(US=US, S=S, Vh=Vh, total_energy=float((S.double() ** 2).sum()), complete=True)


def dense_spectrum(delta: Tensor, k: int, *, keep_basis: bool = False) -> Spectrum | tuple[Spectrum, GramBasis | None]:
    """Top-``k`` singular triplets of a dense ``delta : (d_out, d_in)``.

    For small ``k`` the Gram matrix of the smaller side is eigendecomposed and the result
    refined by one Rayleigh–Ritz step; for large ``k`` a thin SVD is cheaper and used instead.
    ``delta`` is not modified. With ``keep_basis`` the whole Gram eigenbasis is computed and also
    returned (None after a thin SVD, whose returned spectrum is then complete), from which
    :func:`ritz_spectrum` serves a larger ``k`` later without another decomposition; without it
    only the top ``k`` eigenvectors are computed.
    """
    n = min(delta.shape)
    k = min(k, n)
    total = frobenius2(delta)
    if not gram_path(k, delta.shape):
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        keep = n if keep_basis else k  # the other triplets cost nothing more here
        spec = Spectrum(
            US=U[:, :keep] * S[:keep], S=S[:keep].clone(), Vh=Vh[:keep].clone(), total_energy=total, complete=keep == n
        )
        return (spec, None) if keep_basis else spec
    basis = gram_basis(gram_of(delta, total), None if keep_basis else k)
    spec = ritz_spectrum(basis, k, lambda X: delta @ X, lambda Y: delta.T @ Y)
    return (spec, basis) if keep_basis else spec


def gram_path(k: int, shape: tuple[int, int] | torch.Size) -> bool:
    """True when ``k`` triplets of a ``shape`` ΔW are cheaper from its Gram matrix than from a thin SVD."""
    return k < _FULL_SVD_SHARE * min(shape)


@dataclass(frozen=True)
class Gram:
    """The Gram matrix of the smaller side of one module's ΔW.

    Attributes
    ----------
    matrix : Tensor, shape (n, n)
        ``ΔW ΔWᵀ`` (``wide``: ``d_out ≤ d_in``, ``n = d_out``) or ``ΔWᵀ ΔW`` (``n = d_in``).
        :func:`gram_basis` overwrites it on the CPU.
    wide : bool
    shape : tuple[int, int]
        ``(d_out, d_in)`` of ΔW.
    total_energy : float
        ``‖ΔW‖_F²``, accumulated in float64.
    """

    matrix: Tensor
    wide: bool
    shape: tuple[int, int]
    total_energy: float

    @property
    def n(self) -> int:
        """The order of the matrix, ``min(d_out, d_in)``."""
        return min(self.shape)


@dataclass(frozen=True)
class GramBasis:
    """The leading eigenvectors of a :class:`Gram` matrix, leading first.

    Attributes
    ----------
    vecs : Tensor, shape (n, k)
        Column ``i`` belongs to the ``i``-th largest eigenvalue; ``k = n`` for a whole basis.
    wide : bool
        True: left singular directions (``n = d_out``); False: right ones (``n = d_in``).
    shape : tuple[int, int]
        ``(d_out, d_in)`` of ΔW.
    total_energy : float
        ``‖ΔW‖_F²``.
    """

    vecs: Tensor
    wide: bool
    shape: tuple[int, int]
    total_energy: float


def gram_of(delta: Tensor, total_energy: float | None = None) -> Gram:
    """The :class:`Gram` matrix of the smaller side of a dense ``delta : (d_out, d_in)``."""
    wide = delta.shape[0] <= delta.shape[1]
    matrix = delta @ delta.T if wide else delta.T @ delta
    total = frobenius2(delta) if total_energy is None else total_energy
    return Gram(matrix=matrix, wide=wide, shape=(int(delta.shape[0]), int(delta.shape[1])), total_energy=total)


def gram_basis(gram: Gram, k: int | None = None) -> GramBasis:
    """The top ``k`` eigenvectors of ``gram.matrix`` (all ``n`` with ``k`` None), leading first.

    On the CPU a top-``k`` request runs LAPACK ``syevr`` for the index range only
    (``scipy.linalg.eigh(subset_by_index=…)``), in place: ``gram.matrix`` is overwritten, and the
    working memory is ``26 n`` floats plus the ``n × k`` result, where ``torch.linalg.eigh``
    needs ``3 n²`` floats beside the matrix and computes every eigenvector (2.1× the time at
    ``n = 2048``, ``k = 200``). Elsewhere (CUDA) ``torch.linalg.eigh`` computes all of them.
    """
    G = gram.matrix
    n = gram.n
    if k is not None and k < n and G.device.type == "cpu":
        from scipy.linalg import eigh  # a dependency; imported here so a GPU-only server never loads it

        # G is symmetric, so its transpose is a Fortran-ordered view of the same memory: no copy. The
        # k smallest eigenpairs of -G, ascending, are G's k leading ones, leading first: no reversed copy.
        G.neg_()
        _, vecs = eigh(G.numpy().T, subset_by_index=[0, k - 1], driver="evr", overwrite_a=True, check_finite=False)
        lead = torch.from_numpy(vecs)  # (n, k), column-major
    else:
        _, all_vecs = torch.linalg.eigh(G)
        lead = all_vecs.flip(1) if k is None or k >= n else all_vecs[:, n - k :].flip(1)
    return GramBasis(vecs=lead, wide=gram.wide, shape=gram.shape, total_energy=gram.total_energy)


MatMul = Callable[[Tensor], Tensor]


def ritz_spectrum(basis: GramBasis, k: int, matmul: MatMul, rmatmul: MatMul) -> Spectrum:
    """Top-``k`` triplets of ΔW by one Rayleigh–Ritz step on the leading ``k`` Gram eigenvectors.

    ``matmul(X) = ΔW @ X`` for ``X : (d_in, k)`` and ``rmatmul(Y) = ΔWᵀ @ Y`` for
    ``Y : (d_out, k)``: a dense ΔW, or its factors (``Σ c_j B_j (A_j X)``), so that no ΔW is
    needed. One product with ΔW: for right directions ``V`` the SVD of ``ΔW V = U S Wᵀ`` gives
    ``ΔW V Vᵀ = U S (V W)ᵀ``, the best rank-``k`` approximation within the basis' span; its
    singular values are as accurate as the product (float32), not as the squared Gram spectrum.
    """
    n = basis.vecs.shape[1]
    k = min(k, n)
    lead = basis.vecs[:, :k]  # left (wide) or right singular directions
    complete = k == min(basis.shape)
    if basis.wide:
        W, S, Vh = torch.linalg.svd(rmatmul(lead).T, full_matrices=False)  # Uᵀ ΔW : (k, d_in)
        return Spectrum(US=(lead @ W) * S, S=S, Vh=Vh, total_energy=basis.total_energy, complete=complete)
    U, S, Wh = torch.linalg.svd(matmul(lead), full_matrices=False)  # ΔW V : (d_out, k)
    return Spectrum(US=U * S, S=S, Vh=Wh @ lead.T, total_energy=basis.total_energy, complete=complete)


def frobenius2(delta: Tensor, rows: int = 256) -> float:
    """``‖ΔW‖_F²`` accumulated in float64 over blocks of ``rows`` rows.

    A float32 norm of a 2048×5504 matrix is off by ~1e-3 relative; a whole float64 copy would
    cost twice ΔW's memory. The temporary here is one float64 block.
    """
    blocks = [torch.linalg.vector_norm(delta[i : i + rows], dtype=torch.float64) for i in range(0, delta.shape[0], rows)]
    return float((torch.stack(blocks) ** 2).sum()) if blocks else 0.0  # one device sync, not one per block


def redistribute(
    spectrum: Spectrum,
    r: int,
    scaling: float,
    *,
    module: str,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Factors of rank ``r`` for a client with scaling ``s``: ``B = U_r S_r / s``, ``A = V_rᵀ``.

    Parameters
    ----------
    spectrum : Spectrum
        Must hold at least ``min(r, numerical rank)`` triplets.
    r : int
        The receiving client's rank for this module, ``1 <= r <= min(d_out, d_in)``.
    scaling : float
        The receiving client's LoRA scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)``).
    module : str
        Module name: seeds the random completion and names errors.
    seed : int
        Seeds the completion rows, with ``(module, r)``: same inputs, same factors. (default: 0)
    dtype : torch.dtype, optional
        Output dtype. (default: the spectrum's)

    Returns
    -------
    A : Tensor, shape (r, d_in)
        A view of the spectrum's ``Vh`` when no completion row is needed: read-only by contract.
    B : Tensor, shape (d_out, r)
        With ``s · B @ A`` equal to the best rank-``r`` approximation of ΔW; the spectrum's own
        storage when it shares this ``B`` (:meth:`Spectrum.sharing`): read-only by contract.

    Notes
    -----
    Rows of A past the numerical rank ``q`` of ΔW are ``x - x V_qᵀ V_q`` with ``x`` drawn
    uniformly in ``±1/sqrt(d_in)`` (peft's ``kaiming_uniform_(a=sqrt(5))``); B's matching
    columns are zero, so ``s · B @ A`` is unchanged and the gradient on B is non-zero.
    """
    d_out, d_in = spectrum.US.shape[0], spectrum.Vh.shape[1]
    if not 1 <= r <= min(d_out, d_in):
        raise RankError(f"module {module}: rank {r} is outside 1..min(d_out, d_in)={min(d_out, d_in)}")
    kept = min(r, spectrum.numerical_rank())
    if kept < r and not spectrum.complete and kept == spectrum.k:
        raise RankError(f"module {module}: spectrum holds {spectrum.k} triplets, rank {r} was requested")
    out_dtype = dtype or spectrum.US.dtype
    if kept == r:
        A = spectrum.Vh[:r]  # a row slice: contiguous, shares the spectrum's storage (no copy)
        B = spectrum.b_factor(r, scaling)
    else:
        B = torch.zeros(d_out, r, dtype=spectrum.US.dtype, device=spectrum.US.device)
        B[:, :kept] = spectrum.b_factor(kept, scaling)
        A = torch.empty(r, d_in, dtype=spectrum.Vh.dtype, device=spectrum.Vh.device)
        A[:kept] = spectrum.Vh[:kept]
        A[kept:] = _completion_rows(spectrum.Vh[:kept], r - kept, d_in, seed=module_seed(seed, module, r))
    return A.to(out_dtype), B.to(out_dtype)


def module_seed(seed: int, module: str, r: int) -> int:
    """A 63-bit seed for ``(run seed, module, rank)``: completion rows, the filtered solver's start."""
    return (seed * 1_000_003 + zlib.crc32(f"{module}:{r}".encode())) % (2**63)


def _completion_rows(kept: Tensor, n: int, d_in: int, *, seed: int) -> Tensor:
    """``n`` Kaiming-uniform rows with their components along ``kept : (q, d_in)`` removed."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    bound = 1.0 / d_in**0.5
    x: Tensor = (torch.rand(n, d_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    x = x.to(device=kept.device, dtype=kept.dtype)
    if kept.shape[0]:
        x = x - (x @ kept.T) @ kept
    return x
