"""What every method is: :class:`GlobalUpdate`, the method registry, and :class:`FactorsUpdate`.

A method is one :class:`GlobalUpdate` subclass registered under a lowercase name with
:func:`register_method`. It says how one round's replies combine (:meth:`GlobalUpdate.from_round`),
what its ``delta()`` is, what a client of rank ``r`` receives (``_project_module``), which factors
a client trains and sends back (:attr:`GlobalUpdate.trains`), and how it is saved, restored and
exported. The linear algebra it needs comes from :mod:`~flexlora_plugin.core.engine`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor

from ..adapters import LORA_A, LORA_B, lora_scaling, resolve_pattern
from ..engine import EngineStats
from ..errors import MissingModuleError, RankError
from ..validation import ModuleInfo, Ranks, Scaling

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["FactorsUpdate", "GlobalUpdate", "list_methods", "method_class", "register_method"]

U = TypeVar("U", bound="GlobalUpdate")

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
    stats : EngineStats
        The linear-algebra work done for this update, per module (set by :func:`~flexlora_plugin.core.aggregate`).
    """

    method: str = ""
    #: The update is ``ΔW = Σ_k p_k s_k B_k A_k`` of the replies, served by truncated SVD: the
    #: engine may start each module's decomposition as soon as its factors arrive.
    spectral: ClassVar[bool] = False
    #: Which factors a client trains and sends back (``lora_A``, ``lora_B``); a client applies it
    #: through :mod:`~flexlora_plugin.core.client` and the server accepts nothing else.
    trains: ClassVar[tuple[str, ...]] = (LORA_A, LORA_B)
    #: The update accumulates into the clients' base weights: every message carries the running
    #: total (:meth:`base_delta`) and a client trains a fresh LoRA on ``W_0 + base_delta``.
    cumulative: ClassVar[bool] = False
    #: The JSON fields :meth:`state_tensors` returns per module, with their types (``float``,
    #: ``int``, ``bool``, ``str``): the server state checks each on load.
    state_fields: ClassVar[Mapping[str, type]] = {}

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
        self.stats = EngineStats()
        self._projections: dict[tuple[str, int, float, torch.dtype], tuple[Tensor, Tensor]] = {}

    @abstractmethod
    def delta(self, module: str) -> Tensor:
        """Dense ``ΔW : (d_out, d_in)`` of ``module`` in the compute dtype (built on demand)."""

    # Hooks every registered method implements: aggregation, server state, peft export.
    @classmethod
    @abstractmethod
    def from_round(cls, rnd: Round) -> GlobalUpdate:
        """Build this method's update from one round's validated replies (:func:`~flexlora_plugin.core.aggregate` calls it).

        ``rnd`` (:class:`~flexlora_plugin.core.engine.Round`) holds the kept clients (factors,
        weight, scaling ``s_k`` per module), the module infos, the exclusions and the options;
        ``rnd.weights(m)`` gives ``p_k``, ``rnd.weighted_sum(m, c)`` the exact ``Σ_k c_k B_k A_k``.
        """

    @abstractmethod
    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What a server state stores for ``module``: named tensors and JSON extras (the fields of :attr:`state_fields`)."""

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

    def base_delta(self, module: str) -> tuple[Tensor, Tensor] | Tensor | None:
        """What a client adds to its untouched base weight of ``module`` before training (:attr:`cumulative` methods).

        ``(B : (d_out, R), A : (R, d_in))`` with the correction ``B A``, or the dense correction
        ``(d_out, d_in)``, or None (default: nothing, the base stays as it is).
        """
        return None

    def export_target(self, module: str) -> Tensor:
        """The matrix the peft export reproduces (:meth:`export_factors`): :meth:`delta` unless the method says otherwise."""
        return self.delta(module)

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


class FactorsUpdate(GlobalUpdate):
    """A global update held as factors: ``ΔW = scale · B̄ Ā`` per module."""

    state_fields: ClassVar[Mapping[str, type]] = {"scale": float}

    def __init__(
        self,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        excluded: Mapping[Hashable, str],
        *,
        factors: Mapping[str, tuple[Tensor, Tensor]],
        scales: Mapping[str, float],
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(info, clients, excluded, compute_dtype=compute_dtype, device=device, seed=seed)
        self.factors = dict(factors)  # module -> (A_bar : (R, d_in), B_bar : (d_out, R))
        self.scales = dict(scales)

    def delta(self, module: str) -> Tensor:
        self._check_module(module)
        A, B = self.factors[module]
        return self.scales[module] * (B @ A)

    @classmethod
    def from_round(cls, rnd: Round) -> FactorsUpdate:
        raise TypeError(f"{cls.__name__} is not built from client updates")

    @classmethod
    def of_round(
        cls, rnd: Round, factors: Mapping[str, tuple[Tensor, Tensor]], scales: Mapping[str, float] | None = None
    ) -> FactorsUpdate:
        """The update of ``rnd`` holding ``factors`` (module -> ``(Ā, B̄)``) and ``scales`` (default 1 everywhere)."""
        o = rnd.options
        return cls(
            rnd.info,
            rnd.ids,
            rnd.excluded,
            factors=factors,
            scales=dict(scales) if scales is not None else dict.fromkeys(rnd.info, 1.0),
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
        )

    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The global factors ``A``, ``B`` and their ``scale``."""
        A, B = self.factors[module]
        return {"A": A, "B": B}, {"scale": self.scales[module]}

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
    ) -> FactorsUpdate:
        factors = {m: (t["A"], t["B"]) for m, t in tensors.items()}
        scales = {m: float(entries[m]["scale"]) for m in tensors}
        return cls(info, clients, {}, factors=factors, scales=scales, compute_dtype=compute_dtype, seed=seed)

    def exact_rank(self, module: str, tol: float) -> int:
        """The rank of the global factors (ΔW is their product)."""
        return int(self.factors[module][0].shape[0])

    def export_factors(self, module: str, r: int | None, scaling_of: Callable[[int], float], tol: float) -> tuple[Tensor, Tensor]:
        r = self.exact_rank(module, tol) if r is None else r
        return self.project_module(module, r, scaling=scaling_of(r))

    def _energy_kept(self, module: str, r: int) -> float:
        A, B = self.factors[module]
        total = _frob2(B, A)
        if r >= A.shape[0] or total == 0.0:
            return 1.0
        return max(0.0, 1.0 - _frob2(B[:, r:], A[r:]) / total)


def _frob2(B: Tensor, A: Tensor) -> float:
    """``‖B A‖_F² = tr((BᵀB)(AAᵀ))`` without forming ``B A``."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def _to_host(t: Tensor) -> Tensor:
    """``t`` on the CPU; from CUDA an asynchronous copy into page-locked memory (the caller waits once, ``_landed``)."""
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)
