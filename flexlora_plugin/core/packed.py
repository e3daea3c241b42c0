"""A module's Gram matrix in packed storage, and its top-``k`` eigenvectors (LAPACK ``?spevx``).

On the CPU with ``max_rank`` (as both hosts call :func:`~flexlora_plugin.core.aggregate`), a
dense-path module never forms ΔW: its ``n × n`` Gram matrix is built from slabs of ΔW
(:meth:`~flexlora_plugin.core.terms.TermList.gram`) and is the largest allocation of the round
(16 MiB at ``n = 2048`` in float32). It is symmetric, so half of it is enough:

* **Packed storage** (LAPACK's ``UPLO = 'U'``): the upper triangle column after column,
  ``ap[i + j (j + 1) / 2] = G[i, j]`` for ``i ≤ j``, ``n (n + 1) / 2`` numbers.
* **Accumulation in column panels** (:class:`PanelGram`): panel ``J = [j0, j1)`` holds
  ``G[J, :j1]``, the rows of ``G`` whose first ``j + 1`` entries are the packed columns ``j ∈ J``
  (``G`` is symmetric). The panels lie one after the other in one buffer of
  ``n² / 2 + n w / 2`` numbers (``w`` the panel width), and each slab adds
  ``slab[J] @ slab[:j1]ᵀ`` to each panel: about half the FLOPs of the whole ``slab @ slabᵀ``.
  :meth:`PanelGram.pack` then moves each row's triangle part down to its packed place, row after
  row, in the same buffer: a packed column ends before the next row starts, so nothing is
  overwritten before it is read, and no index tensor is built (a boolean mask over a panel costs
  8 bytes of indices per entry: 13 MiB more peak at ``n = 2048``).
* **The eigensolver** (:func:`packed_top_eigvecs`): LAPACK ``?spevx`` for an index range, on
  ``-G`` so that its ``k`` smallest eigenpairs are ``G``'s ``k`` leading ones, leading first.
  Its workspace is ``8 n`` numbers and ``6 n`` integers beside the ``n × k`` result. It is about
  twice the time of ``?syevr`` on the full matrix (0.52 s on one thread against 0.25 s on two at
  ``n = 2048``, ``k = 200``): the reduction to tridiagonal form cannot be blocked in packed storage.
  It runs on one BLAS thread (OpenBLAS's thread-local setting, when scipy's LAPACK is OpenBLAS):
  as fast as two for these level-2 kernels, without OpenBLAS's waiting threads slowing torch's.

``scipy.linalg.lapack`` wraps no packed eigensolver, but scipy exports every LAPACK routine it
links as a C function pointer (``scipy.linalg.cython_lapack.__pyx_capi__``, the way numba reaches
LAPACK): ctypes calls it through that pointer, with scipy's own LAPACK, 32-bit integers.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["PackedEigenError", "PanelGram", "packed_size", "packed_top_eigvecs", "panel_bounds"]

# Panel width of PanelGram: 256 columns keep the GEMMs large and add n·128 numbers to n²/2.
PANEL_WIDTH = 256


class PackedEigenError(RuntimeError):
    """LAPACK ``?spevx`` reported a failure (``info ≠ 0``); the packed matrix is destroyed."""


def packed_size(n: int) -> int:
    """``n (n + 1) / 2``: the numbers of an ``n × n`` symmetric matrix in packed storage."""
    return n * (n + 1) // 2


def panel_bounds(n: int, width: int = PANEL_WIDTH) -> list[tuple[int, int, int]]:
    """``(j0, j1, offset)`` of each column panel ``[j0, j1)`` of :class:`PanelGram`.

    Panel ``J`` is a ``(j1 − j0) × j1`` block at ``offset`` of the shared buffer; the offsets
    are cumulative, so ``offset ≥ packed_size(j0)``, where the panel's packed columns go.
    """
    if n < 1 or width < 1:
        raise ValueError(f"panel_bounds: n={n} and width={width} must be >= 1")
    out, offset = [], 0
    for j0 in range(0, n, width):
        j1 = min(n, j0 + width)
        out.append((j0, j1, offset))
        offset += (j1 - j0) * j1
    return out


class PanelGram:
    """``G = Σ slab slabᵀ`` for slabs ``(n, b)``, its upper triangle only, then packed in place.

    Parameters
    ----------
    n : int
        Order of ``G``.
    dtype : torch.dtype
        float32 or float64 (the LAPACK routines' types).
    width : int
        Panel width. (default: 256)
    """

    def __init__(self, n: int, dtype: torch.dtype, width: int = PANEL_WIDTH) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"PanelGram: {dtype} has no LAPACK packed eigensolver (float32 or float64)")
        self.n = n
        self.bounds = panel_bounds(n, width)
        j0, j1, offset = self.bounds[-1]
        self.buffer = torch.zeros(offset + (j1 - j0) * j1, dtype=dtype, device="cpu")  # LAPACK reads it in place
        self.panels = [self.buffer[o : o + (b - a) * b].view(b - a, b) for a, b, o in self.bounds]
        self._packed = False

    def add(self, slab: Tensor) -> None:
        """``G += slab @ slabᵀ`` for ``slab : (n, b)``, on the panels (upper triangle)."""
        if self._packed:
            raise RuntimeError("PanelGram.add after pack()")
        for (j0, j1, _), panel in zip(self.bounds, self.panels, strict=True):
            panel.addmm_(slab[j0:j1], slab[:j1].T)

    def trace(self) -> float:
        """``tr G``, summed in float64 (``‖ΔW‖_F²`` for a Gram matrix of ΔW)."""
        if self._packed:
            raise RuntimeError("PanelGram.trace after pack()")
        diagonals = (p.diagonal(offset=j0) for (j0, _, _), p in zip(self.bounds, self.panels, strict=True))
        return float(sum(d.sum(dtype=torch.float64) for d in diagonals))

    def pack(self) -> Tensor:
        """``G`` in packed storage, ``(n (n + 1) / 2,)``: a view of the panels' buffer, rewritten in place."""
        if not self._packed:
            flat = self.buffer.numpy()  # numpy copies overlapping ranges correctly (memmove); torch refuses
            for j0, j1, offset in self.bounds:
                for j in range(j0, j1):  # row j - j0 of the panel is G[j, :j1]; its first j + 1 entries are packed column j
                    src = offset + (j - j0) * j1
                    flat[packed_size(j) : packed_size(j + 1)] = flat[src : src + j + 1]
            self.panels = []
            self._packed = True
        return self.buffer[: packed_size(self.n)]


def packed_top_eigvecs(ap: Tensor, n: int, k: int) -> Tensor:
    """The ``k`` leading eigenvectors of the symmetric ``n × n`` matrix packed in ``ap``.

    Parameters
    ----------
    ap : Tensor, shape (n (n + 1) / 2,)
        Packed upper triangle, float32 or float64, contiguous, on the CPU. **Overwritten.**
    n : int
    k : int
        ``1 ≤ k ≤ n``.

    Returns
    -------
    Tensor, shape (n, k)
        Orthonormal columns, column ``i`` for the ``i``-th largest eigenvalue (column-major).

    Raises
    ------
    PackedEigenError
        When LAPACK reports a failure (some eigenvectors did not converge, ``info > 0``).
    """
    if ap.dtype not in (torch.float32, torch.float64) or ap.device.type != "cpu" or not ap.is_contiguous():
        raise TypeError(f"packed_top_eigvecs: ap must be a contiguous float32/float64 CPU tensor, got {ap.dtype} on {ap.device}")
    if ap.numel() != packed_size(n) or not 1 <= k <= n:
        raise ValueError(f"packed_top_eigvecs: {ap.numel()} numbers for n={n} (want {packed_size(n)}), k={k}")
    np_dtype = np.float32 if ap.dtype == torch.float32 else np.float64
    scalar = ctypes.c_float if ap.dtype == torch.float32 else ctypes.c_double
    ap.neg_()  # the k smallest eigenpairs of -G, ascending, are G's k leading ones, leading first
    a = ap.numpy()
    w = np.empty(n, dtype=np_dtype)
    z = np.empty((k, n), dtype=np_dtype)  # column-major (n, k), ldz = n
    work = np.empty(8 * n, dtype=np_dtype)
    iwork = np.empty(5 * n, dtype=np.int32)
    ifail = np.empty(n, dtype=np.int32)
    ints = [ctypes.c_int(v) for v in (n, 1, k, n)]  # n, il, iu, ldz
    zero = scalar(0.0)  # vl, vu (unused with RANGE = 'I'); abstol = 0: LAPACK's default tolerance
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    ref = ctypes.byref
    name = "sspevx" if ap.dtype == torch.float32 else "dspevx"
    routine, set_threads = _lapack(name), _blas_threads_setter(name)
    previous = set_threads(1) if set_threads is not None else None
    try:
        routine(
            ref(ctypes.c_char(b"V")),
            ref(ctypes.c_char(b"I")),
            ref(ctypes.c_char(b"U")),
            ref(ints[0]),
            a.ctypes.data,
            ref(zero),
            ref(zero),
            ref(ints[1]),
            ref(ints[2]),
            ref(zero),
            ref(found),
            w.ctypes.data,
            z.ctypes.data,
            ref(ints[3]),
            work.ctypes.data,
            iwork.ctypes.data,
            ifail.ctypes.data,
            ref(info),
        )
    finally:
        if set_threads is not None:
            set_threads(previous)
    if info.value != 0 or found.value != k:
        raise PackedEigenError(f"LAPACK ?spevx: info={info.value}, {found.value} of {k} eigenvectors (n={n})")
    return torch.from_numpy(z).T


@functools.cache
def _lapack(name: str) -> Callable[..., None]:
    """The LAPACK routine ``name`` that scipy links, as a ctypes function of 18 pointers (the ``?spevx`` arguments)."""
    from scipy.linalg import cython_lapack  # a dependency; imported here so a GPU-only server never loads it

    capsule = cython_lapack.__pyx_capi__[name]
    # own prototypes: setting restype/argtypes on ctypes.pythonapi's shared objects would leak to other users
    api = ctypes.pythonapi
    get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", api))
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(("PyCapsule_GetPointer", api))
    return ctypes.CFUNCTYPE(None, *([ctypes.c_void_p] * 18))(get_pointer(capsule, get_name(capsule)))


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]


@functools.cache
def _blas_threads_setter(name: str) -> Callable[[int], int] | None:
    """OpenBLAS's ``openblas_set_num_threads_local`` from the library holding LAPACK's ``name``.

    It sets the calling thread's count only. None when that library has none (MKL, reference
    LAPACK, an older OpenBLAS) or the platform has no ``dladdr``.

    ``?spevx`` runs on one thread: its packed level-2 kernels gain nothing from a second one, and
    OpenBLAS's waiting worker threads competed with torch's: 0.5 s became 2.1 s per 2048² module
    in some rounds of the 80-client benchmark (2 cores), never with one thread.
    """
    try:
        info = _DlInfo()
        if not ctypes.CDLL(None).dladdr(ctypes.cast(_lapack(name), ctypes.c_void_p), ctypes.byref(info)) or not info.fname:
            return None
        setter = getattr(ctypes.CDLL(info.fname.decode()), "openblas_set_num_threads_local", None)
    except (AttributeError, OSError, TypeError):  # TypeError: CDLL(None) on Windows
        return None
    if setter is not None:
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
    return setter
