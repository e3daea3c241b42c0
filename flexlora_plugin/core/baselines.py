"""The paper's baselines: homogeneous-rank FedAvg and HetLoRA (zero-pad + truncate).

Both keep *global factors* ``B̄ : (d_out, R)`` and ``Ā : (R, d_in)`` per module, with
``ΔW = scale · B̄ Ā``:

* ``fedavg``: every client of a module has the same rank and scaling ``s``;
  ``B̄ = Σ_k p_k B_k``, ``Ā = Σ_k p_k A_k``, ``scale = s``, and ``project`` returns ``(B̄, Ā)``.
* ``hetlora`` (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
  Models", EMNLP 2024): factors are zero-padded to ``R = max_rank`` after moving ``√s_k`` into
  each, ``B̄ = Σ_k w_k √s_k pad(B_k)``, ``Ā = Σ_k w_k √s_k pad(A_k)``, ``scale = 1``; a client of
  rank ``r`` and scaling ``s`` receives ``B = B̄[:, :r] / √s``, ``A = Ā[:r] / √s`` (truncation,
  not an SVD). ``w_k`` is the data-size weight, or ``‖s_k B_k A_k‖_F`` normalised (the HetLoRA
  paper). HetLoRA's local rank self-pruning is a client-side training rule and is out of scope.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .aggregation import AggregateOptions, ClientUpdate, GlobalUpdate, ModuleInfo, register_method
from .errors import RankError

__all__ = ["FactorsUpdate", "FedAvgUpdate", "HetLoRAUpdate"]


class FactorsUpdate(GlobalUpdate):
    """A global update held as factors: ``ΔW = scale · B̄ Ā`` per module."""

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
    def from_clients(
        cls,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
    ) -> FactorsUpdate:
        raise TypeError(f"{cls.__name__} is not built from client updates")

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


@register_method("fedavg")
class FedAvgUpdate(FactorsUpdate):
    """FedAvg of LoRA factors (homogeneous ranks only): ``ΔW = s · (Σ p_k B_k)(Σ p_k A_k)``."""

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
    ) -> FedAvgUpdate:
        compute_dtype, device, seed = options.compute_dtype, options.device, options.seed
        mixed = {}
        for m in info:
            ranks = {c.client: c.factors[m].r for c in clients if m in c.factors}
            if len(set(ranks.values())) > 1:
                mixed[m] = ranks
        if mixed:
            shown = "; ".join(f"{m}: {r}" for m, r in list(mixed.items())[:3])
            raise RankError(f"fedavg needs one rank per module, got mixed client ranks in {len(mixed)} module(s): {shown}")
        factors, scales = {}, {}
        for m in info:
            held = [c for c in clients if m in c.factors]
            s = {c.scalings[m] for c in held}
            if max(s) - min(s) > 1e-6 * max(s):
                raise RankError(f"fedavg needs one scaling per module; module {m} has {sorted(s)}")
            total = sum(c.weight for c in held)
            A = torch.stack([c.weight / total * c.factors[m].A.to(device=device, dtype=compute_dtype) for c in held]).sum(0)
            B = torch.stack([c.weight / total * c.factors[m].B.to(device=device, dtype=compute_dtype) for c in held]).sum(0)
            factors[m], scales[m] = (A, B), max(s)
        ids = [c.client for c in clients]
        return cls(info, ids, excluded, factors=factors, scales=scales, compute_dtype=compute_dtype, device=device, seed=seed)

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        A, B = self.factors[module]
        if r != A.shape[0]:
            raise RankError(f"fedavg: module {module} has rank {A.shape[0]}, a client of rank {r} cannot load it")
        return A.to(dtype), B.to(dtype)  # to the host, if on a device: GlobalUpdate._cached_projection


@register_method("hetlora")
class HetLoRAUpdate(FactorsUpdate):
    """HetLoRA: zero-padded, scale-aligned factor averaging; projection by truncation."""

    @classmethod
    def from_clients(
        cls,
        clients: Sequence[ClientUpdate],
        info: Mapping[str, ModuleInfo],
        excluded: Mapping[Hashable, str],
        options: AggregateOptions,
    ) -> HetLoRAUpdate:
        weighting, max_rank = options.hetlora_weighting, options.max_rank
        compute_dtype, device, seed = options.compute_dtype, options.device, options.seed
        if weighting not in ("data", "norm"):
            raise ValueError(f"hetlora_weighting must be 'data' or 'norm', got {weighting!r}")
        top = max(f.r for c in clients for f in c.factors.values())
        R = max_rank if max_rank is not None else top
        if top > R:
            raise RankError(f"hetlora: a client sent rank {top}, above max_rank={R}")
        factors = {}
        for m, mi in info.items():
            held = [c for c in clients if m in c.factors]
            w = _hetlora_weights(held, m, weighting, compute_dtype, device)
            R_m = min(R, min(mi.shape))
            A = torch.zeros(R_m, mi.shape[1], dtype=compute_dtype, device=device)
            B = torch.zeros(mi.shape[0], R_m, dtype=compute_dtype, device=device)
            for c, w_k in zip(held, w, strict=True):
                f, root = c.factors[m], math.sqrt(c.scalings[m])
                A[: f.r] += (w_k * root) * f.A.to(device=device, dtype=compute_dtype)
                B[:, : f.r] += (w_k * root) * f.B.to(device=device, dtype=compute_dtype)
            factors[m] = (A, B)
        ids, scales = [c.client for c in clients], dict.fromkeys(info, 1.0)
        return cls(info, ids, excluded, factors=factors, scales=scales, compute_dtype=compute_dtype, device=device, seed=seed)

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        A, B = self.factors[module]
        if r > A.shape[0]:
            raise RankError(f"hetlora: module {module} is padded to rank {A.shape[0]}, rank {r} was requested")
        root = math.sqrt(scaling)
        return (A[:r] / root).to(dtype), (B[:, :r] / root).to(dtype)


def _hetlora_weights(
    held: Sequence[ClientUpdate], module: str, weighting: str, dtype: torch.dtype, device: torch.device | str | None
) -> list[float]:
    """Normalised weights; ``"norm"``: ``‖s_k B_k A_k‖_F``, equal weights if every update is zero."""
    if weighting == "data":
        raw = [c.weight for c in held]
    else:
        raw = []
        for c in held:
            f = c.factors[module]
            norm2 = _frob2(f.B.to(device=device, dtype=dtype), f.A.to(device=device, dtype=dtype))
            raw.append(c.scalings[module] * math.sqrt(max(norm2, 0.0)))
    total = sum(raw)
    if total == 0.0:  # every client sent a zero update (e.g. all B = 0 at round 0)
        return [1.0 / len(held)] * len(held)
    return [x / total for x in raw]
