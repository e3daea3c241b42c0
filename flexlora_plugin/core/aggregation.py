"""Server-side aggregation: client adapters in, one global update out.

:func:`aggregate` validates the clients' adapter state dicts (:mod:`~flexlora_plugin.core.validation`,
the trust boundary), applies the exclusion policy and returns a :class:`GlobalUpdate` for the
chosen method, registered with :func:`register_method`:

* ``flexlora`` (:class:`FlexLoRAUpdate`): ``ΔW = Σ_k p_k s_k B_k A_k`` per module, redistributed
  by truncated SVD (Bai et al., "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv:2402.11505);
* ``fedavg`` and ``hetlora``: the baselines, in :mod:`flexlora_plugin.core.baselines`.

``p_k`` is client k's weight (its sample count) renormalised over the clients that have the
module; ``s_k`` its scaling. ΔW replaces (is not added to) the previous round's.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from .adapters import LoRAFactors, lora_scaling, resolve_pattern
from .errors import (
    MissingModuleError,
    NonFiniteUpdateError,
    RankError,
)
from .packed import PackedEigenError
from .projection import (
    Gram,
    GramBasis,
    Spectrum,
    dense_spectrum,
    gram_basis,
    gram_of,
    gram_path,
    module_seed,
    redistribute,
    ritz_spectrum,
)
from .staging import Stack, Verdict, device_verdicts, module_verdict, stage, streams
from .terms import ModuleTerms, StackedTerms, TermList
from .topk import filtered_spectrum
from .validation import ClientUpdate, ModuleInfo, Ranks, Scaling, apply_value_checks, client_module_infos, collect_clients

__all__ = [
    "AggregateOptions",
    "ClientUpdate",
    "FlexLoRAUpdate",
    "GlobalUpdate",
    "Method",
    "ModuleInfo",
    "aggregate",
    "list_methods",
    "method_class",
    "register_method",
]

logger = logging.getLogger(__name__)

Method = str  # a registered method name (list_methods())
U = TypeVar("U", bound="GlobalUpdate")
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class AggregateOptions:
    """What :func:`aggregate` hands every method's ``from_clients``; each method reads the fields it needs."""

    max_rank: int | None = None
    hetlora_weighting: Literal["data", "norm"] = "data"
    compute_dtype: torch.dtype = torch.float32
    device: torch.device | str | None = None
    seed: int = 0
    progress: ProgressFn | None = None
    stacks: Mapping[str, Stack] | None = None  # the factors stacked on the device (staging.stage), if they were
    prepared: Mapping[str, Any] | None = None  # per module, what the method's speculator computed while staging


_METHODS: dict[str, type[GlobalUpdate]] = {}
_AGGREGATING: list[str] = []


def register_method(name: str, *, aggregates: bool = True) -> Callable[[type[U]], type[U]]:
    """Class decorator: register a :class:`GlobalUpdate` subclass as method ``name``.

    ``aggregate(method=name)`` then builds it with its ``from_clients``, and server states and
    peft export dispatch through its own hooks (``state_tensors``/``from_state``,
    ``export_factors``). ``aggregates=False`` registers an update that is only restored and
    exported (the round-1 start). A duplicate name raises.
    """

    def decorate(cls: type[U]) -> type[U]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered (by {_METHODS[name].__name__})")
        cls.method = name
        _METHODS[name] = cls
        if aggregates:
            _AGGREGATING.append(name)
        return cls

    return decorate


def method_class(name: str) -> type[GlobalUpdate]:
    """The update class registered as ``name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown aggregation method {name!r}; registered: {list_methods()}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """The aggregation methods ``aggregate`` and :class:`FlexLoRAConfig` accept, in registration order."""
    return list(_AGGREGATING)


class GlobalUpdate(ABC):
    """The server's global update after one round, ready to be redistributed.

    Attributes
    ----------
    modules : tuple[str, ...]
        Module names, in first-seen order.
    info : Mapping[str, ModuleInfo]
    clients : tuple
        Ids of the clients that contributed.
    excluded : Mapping[Hashable, str]
        Ids of the clients left out this round, with the reason.
    """

    method: str = ""
    reads_client_factors: bool = True  # from_clients reads each client's factors: after staging, device views of them

    def __init__(
        self,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        excluded: Mapping[Hashable, str],
        *,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        self.info = dict(info)
        self.modules = tuple(self.info)
        self.clients = tuple(clients)
        self.excluded = dict(excluded)
        self.compute_dtype = compute_dtype
        self.device = torch.device(device) if device is not None else None
        self.seed = seed
        self._projections: dict[tuple[str, int, float, torch.dtype], tuple[Tensor, Tensor]] = {}

    @abstractmethod
    def delta(self, module: str) -> Tensor:
        """Dense ``ΔW : (d_out, d_in)`` of ``module`` in the compute dtype (built on demand)."""

    # Hooks every registered method implements: aggregation, server state, peft export.
    @classmethod
    @abstractmethod
    def from_clients(
        cls,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
    ) -> GlobalUpdate:
        """Build this method's update from validated clients (:func:`aggregate` calls it); it reads the options it needs."""

    @classmethod
    def speculator(
        cls, clients: Sequence[ClientUpdate], info: Mapping[str, ModuleInfo], options: AggregateOptions
    ) -> Callable[[str, Stack], Any] | None:
        """Work to start on each module as its stack reaches the device, before the value checks end.

        Called by :func:`aggregate` on the stacked (device) path. The result per module reaches
        :meth:`from_clients` as ``options.prepared`` only when the checks excluded no client, so
        the work may assume every client counts. (default: None, nothing to start)
        """
        return None

    @abstractmethod
    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What a server state stores for ``module``: named tensors and JSON extras."""

    @classmethod
    @abstractmethod
    def from_state(
        cls,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        tensors: Mapping[str, Mapping[str, Tensor]],
        entries: Mapping[str, Mapping[str, Any]],
        *,
        compute_dtype: torch.dtype,
        seed: int,
    ) -> GlobalUpdate:
        """Rebuild an update from :meth:`state_tensors` output, per module."""

    @abstractmethod
    def exact_rank(self, module: str, tol: float) -> int:
        """Smallest rank ``r ≥ 1`` whose adapter reproduces ``module``'s ΔW to ``tol`` (relative Frobenius)."""

    @abstractmethod
    def export_factors(self, module: str, r: int | None, scaling_of: Callable[[int], float], tol: float) -> tuple[Tensor, Tensor]:
        """``(A : (r, d_in), B : (d_out, r))`` written to a peft adapter; ``r`` None = the rank reproducing ΔW to ``tol``."""

    @abstractmethod
    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(A : (r, d_in), B : (d_out, r))`` for one module."""

    @abstractmethod
    def _energy_kept(self, module: str, r: int) -> float:
        """``1 - ‖ΔW - s·B_r A_r‖_F² / ‖ΔW‖_F²`` for the rank-``r`` projection."""

    def _check_module(self, module: str) -> ModuleInfo:
        if module not in self.info:
            raise MissingModuleError(f"module {module} is not part of this update (have {len(self.modules)} modules)")
        return self.info[module]

    def rank_for(self, module: str, ranks: Ranks) -> int:
        """Resolve ``ranks`` (an int, or a ``rank_pattern``-style mapping) for ``module``."""
        r = ranks if isinstance(ranks, int) else resolve_pattern(module, ranks)
        if r is None:
            raise RankError(f"module {module}: no entry of the rank map {dict(ranks)} matches it")  # type: ignore[arg-type]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise RankError(f"module {module}: rank must be a positive int, got {r!r}")
        return r

    def project(
        self,
        ranks: Ranks,
        *,
        lora_alpha: float | None = None,
        scaling: Scaling | None = None,
        use_rslora: bool = False,
        dtype: torch.dtype | None = None,
    ) -> dict[str, Tensor]:
        """State dict of factors for a client of the given rank(s), in the input key format.

        Parameters
        ----------
        ranks : int or Mapping[str, int]
            One rank for every module, or a peft ``rank_pattern``-style map
            (full names, suffixes like ``q_proj`` or regexes).
        lora_alpha : float, optional
            The receiver's ``lora_alpha``; its scaling per module is ``lora_scaling(alpha, r)``.
        scaling : float or Mapping[str, float], optional
            The receiver's scaling, overriding ``lora_alpha``.
        use_rslora : bool
            With ``lora_alpha``: ``alpha / sqrt(r)``. (default: False)
        dtype : torch.dtype, optional
            Output dtype. (default: each module's adapter dtype)

        Returns
        -------
        dict[str, Tensor]
            ``A : (r, d_in)`` and ``B : (d_out, r)`` per module. Tensors are cached and shared
            between calls asking for the same (module, rank, scaling): do not modify them in place.
        """
        if lora_alpha is None and scaling is None:
            raise ValueError("project() needs the receiver's lora_alpha or scaling")
        out: dict[str, Tensor] = {}
        for module in self.modules:
            info = self.info[module]
            r = self.rank_for(module, ranks)
            s = self._receiver_scaling(module, r, lora_alpha, scaling, use_rslora)
            out[info.a_key], out[info.b_key] = self._cached_projection(module, r, s, dtype)
        self._landed()  # one wait for every device-to-host copy started above
        return out

    def project_module(self, module: str, r: int, *, scaling: float, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(A : (r, d_in), B : (d_out, r))`` of one module for a receiver of scaling ``s``; cached."""
        out = self._cached_projection(module, r, scaling, dtype)
        self._landed()
        return out

    def _cached_projection(self, module: str, r: int, scaling: float, dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        info = self._check_module(module)
        if r > min(info.shape):
            raise RankError(f"module {module}: rank {r} exceeds min(d_out, d_in)={min(info.shape)} of {info.shape}")
        key = (module, r, scaling, dtype or info.dtype)
        if key not in self._projections:
            A, B = self._project_module(module, r, scaling, dtype or info.dtype)
            self._projections[key] = (_to_host(A), _to_host(B)) if self.device is not None else (A, B)
        return self._projections[key]

    def _landed(self) -> None:
        """Wait for the asynchronous device-to-host copies of :func:`_to_host` (CUDA only)."""
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    @staticmethod
    def _receiver_scaling(module: str, r: int, lora_alpha: float | None, scaling: Scaling | None, use_rslora: bool) -> float:
        if scaling is None:
            return lora_scaling(float(lora_alpha), r, use_rslora)  # type: ignore[arg-type]
        s = scaling if isinstance(scaling, (int, float)) else resolve_pattern(module, scaling)
        if s is None or not math.isfinite(s) or s <= 0:
            raise ValueError(f"module {module}: receiver scaling must be a positive number, got {s!r}")
        return float(s)

    def energy_kept(self, ranks: Ranks) -> dict[str, float]:
        """Per module, the share of ‖ΔW‖_F² that a client of these ranks holds after loading.

        For ``flexlora`` this is ``Σ_{i<r} σ_i² / Σ_i σ_i²``; for every method it equals
        ``1 - ‖ΔW - s·B·A‖_F² / ‖ΔW‖_F²`` (1.0 where ΔW = 0).
        """
        return {m: self._energy_kept(m, min(self.rank_for(m, ranks), min(self.info[m].shape))) for m in self.modules}


@register_method("flexlora")
class FlexLoRAUpdate(GlobalUpdate):
    """FlexLoRA's global update: ``ΔW = Σ_k p_k s_k B_k A_k`` per module, served by truncated SVD.

    A client of rank ``r`` and scaling ``s`` receives ``B = U_r S_r / s``, ``A = V_rᵀ``
    (:func:`~flexlora_plugin.core.projection.redistribute`). Spectra are computed lazily, once
    per module, for the largest rank needed so far; at most one module's dense ΔW exists at a time.
    Reference: Bai et al., NeurIPS 2024, arXiv:2402.11505, Eq. (2)–(3).
    """

    method = "flexlora"
    reads_client_factors = False  # after staging it reads the stacks (views for 80 clients x 10 modules: ~2–4 ms a call)

    def __init__(
        self,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        excluded: Mapping[Hashable, str],
        *,
        terms: Mapping[str, ModuleTerms] | None = None,
        spectra: Mapping[str, Spectrum] | None = None,
        max_rank: int | None = None,
        progress: ProgressFn | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(info, clients, excluded, compute_dtype=compute_dtype, device=device, seed=seed)
        self._terms = dict(terms or {})
        self._spectra: dict[str, Spectrum] = dict(spectra or {})
        self._bases: dict[str, GramBasis] = {}  # kept without max_rank, for later larger ranks
        self._grams: dict[str, Gram] = {}  # stacked path without max_rank: the Gram, for later larger ranks
        self._max_rank = max_rank
        self._progress = progress

    def stacked_rank(self, module: str) -> int:
        """``R = Σ_k r_k`` over the clients that have ``module`` (0 for a restored update)."""
        terms = self._terms.get(module)
        return terms.stacked_rank if terms is not None else 0

    def uses_factored_path(self, module: str) -> bool:
        """True when ``R < min(d_out, d_in)``: exact SVD without a dense ΔW."""
        return 0 < self.stacked_rank(module) < min(self.info[module].shape)

    def delta(self, module: str) -> Tensor:
        return self._delta(module, self.compute_dtype)

    def _delta(self, module: str, dtype: torch.dtype) -> Tensor:
        self._check_module(module)
        if module not in self._terms:
            spec = self._spectra[module]
            if not spec.complete:
                raise RankError(f"module {module}: restored update holds only its top {spec.k} triplets; ΔW is not available")
            return (spec.us() @ spec.Vh).to(dtype)
        return self._terms[module].delta(dtype, self.device)

    def exact_spectrum(self, module: str) -> Spectrum:
        """All singular triplets of ``module``'s ΔW computed in float64; not cached.

        For export: float32 triplets reconstructed a trained SmolLM2 ΔW only to 1.4e-5 (relative
        Frobenius), above the export's 1e-5. A restored update answers its stored triplets.
        """
        self._check_module(module)
        if module not in self._terms:
            return self.spectrum(module, 1)
        f64 = torch.float64
        if self.uses_factored_path(module):
            return self._terms[module].factored_spectrum(f64, self.device)
        return dense_spectrum(self._delta(module, f64), min(self.info[module].shape))  # type: ignore[return-value]

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
    ) -> FlexLoRAUpdate:
        """``ΔW = Σ_k p_k s_k B_k A_k`` per module, ``p_k`` renormalised over the clients holding it (kept factored)."""
        coefs = _coefficients(clients, info)
        terms: dict[str, ModuleTerms] = {}
        for m, shape in ((m, mi.shape) for m, mi in info.items()):
            if options.stacks is not None:  # one stack per module, on the device
                terms[m] = _stacked_terms(options.stacks[m], coefs[m], shape)
            else:
                held = [(coefs[m][c.client], c.factors[m].B, c.factors[m].A) for c in clients if m in c.factors]
                terms[m] = TermList(held, shape)
        o = options
        update = cls(
            info,
            [c.client for c in clients],
            excluded,
            terms=terms,
            max_rank=o.max_rank,
            progress=o.progress,
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
        )
        for m, prepared in (o.prepared or {}).items():
            spec, gram = prepared or (None, None)
            if spec is None or m not in update.info:
                continue
            update._spectra[m] = spec
            if gram is not None:
                update._grams[m] = gram
            if o.progress is not None:
                o.progress(len(update._spectra), len(update.modules), m)
        return update

    @classmethod
    def speculator(
        cls, clients: Sequence[ClientUpdate], info: Mapping[str, ModuleInfo], options: AggregateOptions
    ) -> Callable[[str, Stack], Any] | None:
        """Each module's spectrum, as :meth:`spectrum` would compute it first, while later modules still copy.

        For ``max_rank`` triplets, or without it the module's largest client rank (the default
        call's first decomposition). Returns ``(Spectrum, Gram or None)``.
        """
        coefs = _coefficients(clients, info)

        def spectrum_of(module: str, st: Stack) -> tuple[Spectrum | None, Gram | None]:
            terms = _stacked_terms(st, coefs[module], info[module].shape)
            probe = cls(
                info,
                [],
                {},
                terms={module: terms},
                max_rank=options.max_rank,
                compute_dtype=options.compute_dtype,
                device=options.device,
                seed=options.seed,
            )
            try:  # k = 1: _spectrum widens it to the first decomposition's width (max_rank, or the largest client rank)
                spec = probe._spectrum(module, 1)  # under aggregate()'s ieee_float32()
            except RuntimeError as err:  # e.g. non-finite factors the checks will exclude: computed again, lazily
                logger.debug("module %s: no spectrum while staging (%s)", module, err)
                return None, None
            return spec, probe._grams.get(module)

        return spectrum_of

    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Return the singular triplets (``US``, ``S``, ``Vh``) a server state stores.

        All of them on the factored path (a restored update can rebuild ΔW and export it
        exactly), the top ``max_rank`` on the dense path.
        """
        spec = self.spectrum(module, max_rank or min(self.info[module].shape))
        dense = module in self._terms and not self.uses_factored_path(module)  # a restored update keeps what it has
        if max_rank is not None and spec.k > max_rank and dense:
            spec = Spectrum(
                US=spec.US[:, :max_rank],
                S=spec.S[:max_rank],
                Vh=spec.Vh[:max_rank],
                total_energy=spec.total_energy,
                complete=False,
                us_scale=spec.us_scale,
            )
        extras = {"total_energy": spec.total_energy, "complete": spec.complete, "us_scale": spec.us_scale}
        return {"US": spec.US, "S": spec.S, "Vh": spec.Vh}, extras  # US as held (U S / us_scale): no copy to save it

    @classmethod
    def from_state(
        cls,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        tensors: Mapping[str, Mapping[str, Tensor]],
        entries: Mapping[str, Mapping[str, Any]],
        *,
        compute_dtype: torch.dtype,
        seed: int,
    ) -> FlexLoRAUpdate:
        spectra = {
            m: Spectrum(
                US=t["US"],
                S=t["S"],
                Vh=t["Vh"],
                total_energy=float(entries[m]["total_energy"]),
                complete=bool(entries[m]["complete"]),
                us_scale=float(entries[m].get("us_scale", 1.0)),
            )
            for m, t in tensors.items()
        }
        return cls(info, clients, {}, spectra=spectra, compute_dtype=compute_dtype, seed=seed)

    def exact_rank(self, module: str, tol: float) -> int:
        """Smallest ``r ≥ 1`` with ``‖ΔW − [ΔW]_r‖_F ≤ tol · ‖ΔW‖_F``, from the float64 spectrum."""
        return self.exact_spectrum(module).rank_at(tol)

    def export_factors(self, module: str, r: int | None, scaling_of: Callable[[int], float], tol: float) -> tuple[Tensor, Tensor]:
        """The leading triplets themselves, from a float64 spectrum.

        Not :meth:`project_module`: for clients it swaps triplets below ``matrix_rank``'s cutoff
        for zero-B completion rows, and float32 triplets reproduce ΔW only to ~1e-5. With ``r``
        None, half of ``tol`` goes to truncation, half is left to storing the factors in the
        compute dtype.
        """
        spec = self.exact_spectrum(module)
        r = spec.rank_at(tol / 2) if r is None else r
        scaling = scaling_of(r)
        return spec.Vh[:r].to(self.compute_dtype), spec.b_factor(r, scaling).to(self.compute_dtype)

    def spectrum(self, module: str, k: int) -> Spectrum:
        """Leading singular triplets of ``module``'s ΔW, at least ``min(k, rank)`` of them."""
        with ieee_float32():
            return self._spectrum(module, k)

    def _spectrum(self, module: str, k: int) -> Spectrum:
        info = self._check_module(module)
        cached = self._spectra.get(module)
        if cached is not None and (cached.complete or cached.k >= k):
            return cached
        if module not in self._terms:
            held = cached.k if cached else 0
            raise RankError(f"module {module}: restored update holds {held} triplets, rank {k} was requested")
        terms = self._terms[module]
        if self.uses_factored_path(module):
            spec = terms.factored_spectrum(self.compute_dtype, self.device)  # complete: a saved state can rebuild ΔW
        elif module in self._bases:  # a rank above the first decomposition's: one Ritz step on the factors
            spec = ritz_spectrum(self._bases[module], k, terms.matmul, terms.rmatmul)
        elif isinstance(terms, StackedTerms):  # on the device: one GEMM for ΔW, an iterative top-k solve
            spec = self._stacked_spectrum(module, terms, min(max(k, self._max_rank or max(terms.ranks)), min(info.shape)))
        elif self._max_rank is None:  # keep the whole Gram eigenbasis for later, larger ranks
            target = min(max(k, max(terms.ranks)), min(info.shape))
            spec, basis = dense_spectrum(self.delta(module), target, keep_basis=True)  # type: ignore[misc]
            if basis is not None and not spec.complete:
                self._bases[module] = basis
        elif self._low_memory(module, max(k, self._max_rank)):  # no ΔW: Gram from slabs, top-k eigenvectors
            target = max(k, self._max_rank)
            try:  # the packed Gram matrix on the CPU: half the memory
                basis = gram_basis(terms.gram(self.compute_dtype, self.device), target)
            except PackedEigenError as err:  # it is overwritten: build it again, whole, for syevr
                logger.warning("module %s: %s; retrying with the whole Gram matrix", module, err)
                basis = gram_basis(terms.gram(self.compute_dtype, self.device, packed=False), target)
            spec = ritz_spectrum(basis, target, terms.matmul, terms.rmatmul)
            del basis
            _trim_heap()
        else:
            spec = dense_spectrum(self.delta(module), min(max(k, self._max_rank), min(info.shape)))  # type: ignore[assignment]
        if cached is not None:
            logger.debug("module %s: spectrum extended from %d to %d triplets", module, cached.k, spec.k)
        self._spectra[module] = spec
        if self._progress is not None:
            self._progress(len(self._spectra), len(self.modules), module)
        return spec

    def _stacked_spectrum(self, module: str, terms: StackedTerms, k: int) -> Spectrum:
        """Top-``k`` triplets of a stacked module: ΔW in one GEMM, its Gram, the certified filtered solver.

        Without ``max_rank`` the Gram matrix is kept (``n²`` floats on the device), so a later,
        larger rank costs one more solve on it and products with the factors, never another ΔW.
        Falls back to the dense decomposition when the solver is not worthwhile or not certified.
        """
        shape = self.info[module].shape
        gram = self._grams.pop(module, None)
        delta = None
        if gram is None:
            if not gram_path(k, shape):
                return dense_spectrum(terms.delta(self.compute_dtype, self.device), k)  # type: ignore[return-value]
            delta = terms.delta(self.compute_dtype, self.device)
            gram = gram_of(delta)
        if delta is not None:
            matmul, rmatmul = (lambda X: delta @ X), (lambda Y: delta.T @ Y)
        else:
            matmul, rmatmul = terms.matmul, terms.rmatmul
        spec = None
        if gram_path(k, shape):
            spec = filtered_spectrum(gram, k, matmul, rmatmul, seed=module_seed(self.seed, module, k))
        if spec is None:  # not worthwhile, or not certified: every eigenvector of the Gram matrix
            spec = ritz_spectrum(gram_basis(dataclasses.replace(gram, matrix=gram.matrix.clone()), k), k, matmul, rmatmul)
        if self._max_rank is None:
            self._grams[module] = gram
        return spec

    def _low_memory(self, module: str, k: int) -> bool:
        """Whether ``module``'s top ``k`` triplets come from slabs and the factors, with no dense ΔW.

        On the CPU (the clients' own factors, :class:`TermList`) when ``k`` is small enough for the
        Gram path. A CUDA device stacks the factors and forms ΔW in one GEMM instead.
        """
        return isinstance(self._terms[module], TermList) and gram_path(k, self.info[module].shape)

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        spec = self.spectrum(module, r)
        A, B = redistribute(spec, r, scaling, module=module, seed=self.seed, dtype=dtype)
        if r == spec.k and B is not spec.US and B.dtype == spec.US.dtype and r <= spec.numerical_rank():
            self._spectra[module] = spec.sharing(B, scaling)  # B is U S / s: the cached US is freed, not kept twice
        return A, B

    def _energy_kept(self, module: str, r: int) -> float:
        return self.spectrum(module, r).energy_kept(r)


_MALLOC_TRIM: Callable[[int], int] | None | bool = False  # False: not looked up yet; None: not glibc


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim(0)``); a no-op without glibc.

    Between dense-path modules the small, long-lived factors a module keeps sit among the freed
    Gram, slab and Rayleigh–Ritz blocks of the previous ones; glibc keeps those pages resident
    (measured: ~3 MiB per module, 30 % of the server's extra peak in the 80-client benchmark).
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


def aggregate(
    states: Sequence[Mapping[str, Tensor]] | Mapping[Any, Mapping[str, Tensor]],
    weights: Sequence[float] | Mapping[Any, float],
    *,
    method: str = "flexlora",
    lora_alpha: float | None = None,
    scalings: Sequence[Scaling] | Mapping[Any, Scaling] | None = None,
    use_rslora: bool = False,
    expected_ranks: Sequence[Ranks | None] | Mapping[Any, Ranks | None] | None = None,
    on_invalid: Literal["raise", "exclude"] = "raise",
    expected_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_norm: float | None = None,
    max_rank: int | None = None,
    hetlora_weighting: Literal["data", "norm"] = "data",
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: ProgressFn | None = None,
    stack_on_device: bool | None = None,
) -> GlobalUpdate:
    """Aggregate client LoRA adapters of possibly different ranks into one global update.

    Parameters
    ----------
    states : sequence or mapping of adapter state dicts
        One per client, in peft (``…q_proj.lora_A.weight``) or FS-LLM
        (``…q_proj.lora_A.default.weight``) key format; ranks may differ per client and module.
        A mapping's keys are the client ids used in messages and in ``excluded``.
    weights : sequence or mapping of float
        Positive, finite; typically each client's sample count. Normalised per module.
    method : str
        A registered method (:func:`list_methods`: ``"flexlora"``, ``"fedavg"``, ``"hetlora"``, or
        one added with :func:`register_method`). (default: "flexlora")
    lora_alpha : float, optional
        Clients' ``lora_alpha``; ``s_k = lora_scaling(lora_alpha, r_k, use_rslora)`` per module.
    scalings : sequence or mapping, optional
        Per client a float or a per-module mapping; overrides ``lora_alpha``.
    use_rslora : bool
        (default: False)
    expected_ranks : sequence or mapping, optional
        Per client the rank (int or rank map) it was assigned; a client reporting another rank
        is invalid.
    on_invalid : {"raise", "exclude"}
        What to do with a malformed client (bad keys or dtypes, ranks, shapes, an update too
        large to aggregate): raise, or leave it out of this round with a :class:`FlexLoRAWarning`.
        Clients with NaN/Inf factors are always excluded with a warning. (default: "raise")
    expected_shapes : Mapping[str, tuple[int, int]], optional
        Module -> ``(d_out, d_in)`` the server knows (e.g. from its model): a client with another
        shape, or a module not listed, is invalid, whichever client arrives first. (default: the
        first client's shapes are the reference)
    max_norm : float, optional
        An optional bound on each client's ``s·‖B‖_F·‖A‖_F`` per module (float64); a client above
        it is invalid. Off by default. Independently, an update that would overflow float32
        aggregation (above ``√max(float32) / N``) is always invalid.
    max_rank : int, optional
        ``flexlora``: the largest rank that will be requested. Each module is decomposed once,
        for ``max(max_rank, requested)`` triplets, and only those are kept; on the CPU a dense-path
        module then never forms its ``d_out × d_in`` ΔW (Gram matrix from slabs, top-k ``syevr``,
        Rayleigh–Ritz on the factors: the least memory, about the speed of the default). Without it the first
        request decomposes for the largest client rank of the module and keeps the Gram
        eigenbasis (``min(d_out, d_in)²`` floats per dense-path module, 16 MiB at 2048), so a
        later, larger rank costs one Rayleigh–Ritz step on the factors and never another ΔW or
        decomposition; pass it to keep less. ``hetlora``: the padded global rank (default: the
        largest client rank).
    hetlora_weighting : {"data", "norm"}
        HetLoRA weights: data sizes, or ``‖s_k B_k A_k‖_F`` (the HetLoRA paper). (default: "data")
    compute_dtype : torch.dtype
        torch.float32 (default) or torch.float64.
    device : torch.device or str, optional
        Where the math runs (e.g. "cuda"); results come back on the CPU. On CUDA the factors are
        stacked on the device through pinned, overlapped copies (directly, when the states'
        tensors are already page-locked: ``t.pin_memory()``), checked there, and ΔW is one GEMM
        per module (:mod:`~flexlora_plugin.core.staging`). ``flexlora`` computes each module's
        spectrum while later modules still copy, in worker threads on their own streams, with a
        certified iterative top-k solver (:mod:`~flexlora_plugin.core.topk`; discarded and
        recomputed if the checks exclude a client). The round's factors then live on the device
        until the update is freed.
    seed : int
        Seeds the random completion rows of ``flexlora`` projections. (default: 0)
    progress : callable, optional
        ``progress(done, total, module)`` after each module's spectrum (``flexlora``).
    stack_on_device : bool, optional
        Stack and check the factors on ``device`` as described above. (default: True on CUDA,
        False elsewhere, where the clients' own tensors are used without a copy)

    Returns
    -------
    GlobalUpdate

    Raises
    ------
    ValueError
        Empty client list, bad weights, no ``lora_alpha``/``scalings``, unknown method.
    FlexLoRAError
        A malformed client with ``on_invalid="raise"``; :class:`NonFiniteUpdateError` when no
        client is left.
    """
    cls = method_class(method)  # unknown name: ValueError listing the registered methods
    if method not in _AGGREGATING:
        raise ValueError(f"method {method!r} is not an aggregation method; registered: {list_methods()}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    stacked = _stack_on(device) if stack_on_device is None else bool(stack_on_device and device is not None)
    clients, excluded = collect_clients(
        states,
        weights,
        lora_alpha=lora_alpha,
        scalings=scalings,
        use_rslora=use_rslora,
        expected_ranks=expected_ranks,
        on_invalid=on_invalid,
        max_norm=max_norm,
        check_values=not stacked,
    )
    info = client_module_infos(clients, excluded, on_invalid, expected_shapes)
    clients = [c for c in clients if c.client not in excluded]
    options = AggregateOptions(
        max_rank=max_rank,
        hetlora_weighting=hetlora_weighting,
        compute_dtype=compute_dtype,
        device=device,
        seed=seed,
        progress=progress,
    )
    if stacked and clients:
        speculate = cls.speculator(clients, info, options)
        with ieee_float32():  # set once here: the setting is process-wide and the workers share it
            clients, stacks, prepared = _staged(
                clients,
                info,
                excluded,
                on_invalid,
                max_norm,
                torch.device(device),
                speculate,  # type: ignore[arg-type]
                views=cls.reads_client_factors,
            )
        info = {m: i for m, i in info.items() if any(m in c.factors for c in clients)}  # as the host path: held modules only
        options = dataclasses.replace(options, stacks={m: st for m, st in stacks.items() if m in info}, prepared=prepared)
    if not clients:
        raise NonFiniteUpdateError(f"no usable client update this round; excluded: {excluded}")
    if not stacked:  # the checks' temporaries (isfinite masks, norms) would otherwise stay resident between client factors
        _trim_heap()  # (stacked, the checks ran on the stacks: nothing small to give back, and a trim costs ms)
    return cls.from_clients(clients, info, excluded, options)


def _stack_on(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _staged(
    clients: list[ClientUpdate],
    info: Mapping[str, ModuleInfo],
    excluded: dict[Hashable, str],
    on_invalid: str,
    max_norm: float | None,
    device: torch.device,
    speculate: Callable[[str, Stack], Any] | None = None,
    views: bool = True,
) -> tuple[list[ClientUpdate], dict[str, Stack], dict[str, Any]]:
    """Stage the clients' factors on ``device`` and apply the value checks there.

    Returns the kept clients, with device views as factors when ``views`` (else their own
    factors: the method reads the stacks), the stacks, and per module what ``speculate``
    computed while staging (empty when a client was excluded: it assumed them all).
    """
    host = {c.client: {m: (f.A, f.B) for m, f in c.factors.items()} for c in clients}
    with _ModuleRunner(device, speculate) as runner:
        stacks = stage(host, list(info), device, on_module=runner.submit)
        results = runner.results()
    verdicts = {m: v for m, (v, _) in results.items()}
    nonfinite, norms = device_verdicts(verdicts, {c.client: c.scalings for c in clients})
    before = len(clients)
    clients = apply_value_checks(clients, excluded, nonfinite, on_invalid, max_norm, norms)
    prepared = {m: p for m, (_, p) in results.items()} if len(clients) == before else {}  # computed for every client
    keep = {c.client for c in clients}
    stacks = {m: st.select(keep) for m, st in stacks.items()}
    if not views:
        return clients, stacks, prepared
    on_device = {m: st.views() for m, st in stacks.items()}  # one pass per module, not one per client and module
    moved = []
    for c in clients:  # LoRAFactors(...), not dataclasses.replace: 800 of these per call
        factors = {m: LoRAFactors(*on_device[m][c.client], f.a_key, f.b_key) for m, f in c.factors.items()}
        moved.append(dataclasses.replace(c, factors=factors))
    return moved, stacks, prepared


_WORKERS = 6  # CUDA worker threads, one stream each: at most this many modules computed at once (8, 10: no faster)


class _ModuleRunner:
    """Per module, as its stack arrives: the value checks and the method's speculative work.

    On CUDA in a few worker threads, each job on its own stream behind the module's copy, so the
    GPU computes module ``m`` while ``m+1`` is copied and the small, latency-bound decompositions
    of different modules overlap. Elsewhere inline, in order.
    """

    def __init__(self, device: torch.device, speculate: Callable[[str, Stack], Any] | None) -> None:
        self.device, self.speculate = device, speculate
        workers = _WORKERS
        self.pool = None
        if device.type == "cuda":
            _load_cuda_linalg(device)
            self.pool = ThreadPoolExecutor(workers, thread_name_prefix="flexlora-module")
            self.free: queue.SimpleQueue = queue.SimpleQueue()  # at most `workers` jobs run: one stream each
            for stream in streams(device, "modules", workers):
                self.free.put(stream)
        self.futures: dict[str, Future] = {}

    def __enter__(self) -> _ModuleRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, module: str, stack: Stack) -> None:
        if self.pool is None:
            done: Future = Future()
            done.set_result(self._job(module, stack))
            self.futures[module] = done
            return
        ready = torch.cuda.Event()
        ready.record(torch.cuda.current_stream(self.device))  # behind the copy and B_cat's concatenation
        self.futures[module] = self.pool.submit(self._on_stream, module, stack, ready)

    def _on_stream(self, module: str, stack: Stack, ready: torch.cuda.Event) -> tuple[Verdict, Any]:
        stream = self.free.get()
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(stream):
                stream.wait_event(ready)
                stack.A_cat.record_stream(stream)
                stack.B_cat.record_stream(stream)
                out = self._job(module, stack)
                stream.synchronize()  # the caller's stream may use the results without waiting on this one
        finally:
            self.free.put(stream)
        return out

    def _job(self, module: str, stack: Stack) -> tuple[Verdict, Any]:
        verdict = module_verdict(stack)
        if self.speculate is None or any(verdict.nonfinite):
            return verdict, None
        return verdict, self.speculate(module, stack)

    def results(self) -> dict[str, tuple[Verdict, Any]]:
        return {m: f.result() for m, f in self.futures.items()}


def _to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU; from CUDA an asynchronous copy into page-locked memory (the caller waits once, :meth:`_landed`)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


_CUDA_LINALG_LOADED: set[torch.device] = set()


def _load_cuda_linalg(device: torch.device) -> None:
    """Call torch's CUDA linear algebra once, on this thread, before the workers do.

    Its library loads lazily, and a first call from several threads at once fails ("lazy wrapper
    should be called at most once", torch 2.11 on an H100).
    """
    if device in _CUDA_LINALG_LOADED:
        return
    eye = torch.eye(2, dtype=torch.float64, device=device)
    torch.linalg.eigh(eye)
    factor = torch.linalg.cholesky_ex(eye)[0]
    torch.linalg.solve_triangular(factor, eye, upper=False)
    torch.cholesky_solve(eye, factor)  # topk.cutoff_estimate
    _CUDA_LINALG_LOADED.add(device)


def _coefficients(clients: Sequence[ClientUpdate], info: Mapping[str, ModuleInfo]) -> dict[str, dict[Hashable, float]]:
    """``c_k = p_k s_k`` per module and client, ``p_k`` renormalised over the clients holding the module."""
    out: dict[str, dict[Hashable, float]] = {}
    for m in info:
        holders = [c for c in clients if m in c.factors]
        total = sum(c.weight for c in holders)  # once per module (it was summed again for every client)
        out[m] = {c.client: c.weight / total * c.scalings[m] for c in holders}
    return out


def _stacked_terms(st: Stack, coefs: Mapping[Hashable, float], shape: tuple[int, int]) -> StackedTerms:
    """The stack with ``c_j`` repeated over client ``j``'s rows (on the device: no Python list of ``R`` floats)."""
    device = st.A_cat.device
    per_client = torch.tensor([coefs[c] for c in st.clients], dtype=torch.float64).to(device, non_blocking=True)
    ranks = torch.tensor(st.ranks).to(device, non_blocking=True)
    coef = torch.repeat_interleave(per_client, ranks, output_size=st.A_cat.shape[0])
    return StackedTerms(st.B_cat, st.A_cat, coef, st.ranks, shape)
