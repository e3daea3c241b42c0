"""FlexLoRA: the exact weighted sum of the clients' products, served to each client by truncated SVD.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, arXiv:2402.11505, Eq. (2)–(3). Per module, the round's full-size update
is the weighted sum of the clients' own products

    ΔW = Σ_k p_k s_k B_k A_k,

``p_k`` client k's weight renormalised over the clients holding the module, ``s_k`` its LoRA
scaling. It replaces (is not added to) the previous round's. A client of rank ``r`` and scaling
``s`` receives the best rank-``r`` approximation of ΔW by truncated SVD, ``U S Vᵀ ≈ ΔW``:

    B = U_r S_r / s,   A = V_rᵀ,   so that  s · B A = [ΔW]_r  (Eckart–Young).

Directions beyond the numerical rank of ΔW (fewer than ``r``) get a zero column of B and a
seeded random row of A orthogonal to the kept ones, so they can still learn
(:func:`~flexlora_plugin.core.projection.redistribute`). Clients train and send both factors.

Energy: the share of ‖ΔW‖_F² a rank-``r`` client holds, ``Σ_{i<r} σ_i² / Σ_i σ_i²``. Server
state: the singular triplets (all of them when ΔW has fewer than ``min(d_out, d_in)``
directions, else the top ``max_rank``). Export: the leading triplets at the rank reproducing
ΔW to the tolerance, or at a chosen rank.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..engine import EngineStats, LowRankSum
from ..projection import Spectrum, redistribute
from ..validation import ModuleInfo
from .base import GlobalUpdate, register_method

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["FlexLoRAUpdate"]


@register_method("flexlora")
class FlexLoRAUpdate(GlobalUpdate):
    """FlexLoRA's global update: ``ΔW = Σ_k p_k s_k B_k A_k`` per module, served by truncated SVD.

    Spectra are computed lazily, once per module, for the largest rank needed so far
    (:class:`~flexlora_plugin.core.engine.LowRankSum`); at most one module's dense ΔW exists at
    a time.

    Attributes
    ----------
    stats : EngineStats
        The linear-algebra work done for this update, per module.
    """

    spectral: ClassVar[bool] = True
    state_fields: ClassVar[Mapping[str, type]] = {"total_energy": float, "complete": bool, "us_scale": float}

    def __init__(
        self,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        excluded: Mapping[Hashable, str],
        *,
        sums: Mapping[str, LowRankSum],
        stats: EngineStats | None = None,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(info, clients, excluded, compute_dtype=compute_dtype, device=device, seed=seed)
        self.sums = dict(sums)
        self.stats = stats if stats is not None else EngineStats()

    @classmethod
    def from_round(cls, rnd: Round) -> FlexLoRAUpdate:
        """``ΔW = Σ_k p_k s_k B_k A_k`` per module over the clients holding it, kept factored."""
        sums = {}
        for m in rnd.info:
            p, s = rnd.weights(m), rnd.scalings(m)
            sums[m] = rnd.weighted_sum(m, {k: p[k] * s[k] for k in p})
        o = rnd.options
        return cls(
            rnd.info,
            rnd.ids,
            rnd.excluded,
            sums=sums,
            stats=rnd.stats,
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
        )

    # ------------------------------------------------------------------ the rule
    def delta(self, module: str) -> Tensor:
        return self._sum(module).delta(self.compute_dtype)

    def spectrum(self, module: str, k: int) -> Spectrum:
        """Leading singular triplets of ``module``'s ΔW, at least ``min(k, rank)`` of them."""
        return self._sum(module).spectrum(k)

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``B = U_r S_r / s``, ``A = V_rᵀ``."""
        spec = self.spectrum(module, r)
        A, B = redistribute(spec, r, scaling, module=module, seed=self.seed, dtype=dtype)
        if r == spec.k and r <= spec.numerical_rank():
            self.sums[module].keep_sharing(B, scaling)  # B is U S / s: the cached U S is freed, not kept twice
        return A, B

    def _energy_kept(self, module: str, r: int) -> float:
        return self.spectrum(module, r).energy_kept(r)

    # ------------------------------------------------------------------ what the engine chose
    def stacked_rank(self, module: str) -> int:
        """``R = Σ_k r_k`` over the clients that have ``module`` (0 for a restored update)."""
        return self._sum(module).stacked_rank

    def uses_factored_path(self, module: str) -> bool:
        """True when ``R < min(d_out, d_in)``: exact SVD without a dense ΔW."""
        return self._sum(module).factored

    def exact_spectrum(self, module: str) -> Spectrum:
        """All singular triplets of ``module``'s ΔW computed in float64; not cached.

        For export: float32 triplets reconstruct a trained ΔW only to ~1e-5 (relative
        Frobenius), the export's own tolerance. A restored update answers its stored triplets.
        """
        return self._sum(module).exact_spectrum()

    def _sum(self, module: str) -> LowRankSum:
        self._check_module(module)
        return self.sums[module]

    # ------------------------------------------------------------------ state and export
    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The singular triplets (``US``, ``S``, ``Vh``) a server state stores.

        All of them on the factored path (a restored update can rebuild ΔW and export it
        exactly), the top ``max_rank`` on the dense path.
        """
        summed = self._sum(module)
        spec = summed.spectrum(max_rank or min(self.info[module].shape))
        dense = summed.terms is not None and not summed.factored  # a restored update keeps what it has
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
        sums = {}
        for m, t in tensors.items():
            e = entries[m]
            spec = Spectrum(
                US=t["US"],
                S=t["S"],
                Vh=t["Vh"],
                total_energy=float(e["total_energy"]),
                complete=bool(e["complete"]),
                us_scale=float(e.get("us_scale", 1.0)),
            )
            sums[m] = LowRankSum.restored(m, spec, info[m].shape, seed=seed)
        return cls(info, clients, {}, sums=sums, compute_dtype=compute_dtype, seed=seed)

    def exact_rank(self, module: str, tol: float) -> int:
        """Smallest ``r ≥ 1`` with ``‖ΔW − [ΔW]_r‖_F ≤ tol · ‖ΔW‖_F``, from the float64 spectrum."""
        return self.exact_spectrum(module).rank_at(tol)

    def export_factors(self, module: str, r: int | None, scaling_of: Callable[[int], float], tol: float) -> tuple[Tensor, Tensor]:
        """The leading triplets themselves, from a float64 spectrum: ``A = V_rᵀ``, ``B = U_r S_r / s_r``.

        Not :meth:`project_module`, which swaps triplets below the numerical rank for completion
        rows. With ``r`` None, half of ``tol`` goes to truncation, half to storing the factors in
        the compute dtype. A rank above the ``k`` triplets the update has (a round whose clients
        stacked fewer ranks) exports those ``k``: the update exactly.
        """
        spec = self.exact_spectrum(module)
        r = spec.rank_at(tol / 2) if r is None else min(r, spec.k)
        return spec.Vh[:r].to(self.compute_dtype), spec.b_factor(r, scaling_of(r)).to(self.compute_dtype)
