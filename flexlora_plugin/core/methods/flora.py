"""FLoRA: the round's products stacked exactly, added to every client's base; a fresh LoRA each round.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank
Adaptations", NeurIPS 2024. Round ``t``'s update is the exact stack of the clients' products

    ΔW_t = Σ_k p_k s_k B_k A_k = B_g A_g,   B_g = [B_1 … B_K],   A_g = [p_1 s_1 A_1; …; p_K s_K A_K],

and, instead of being sent back as LoRA factors, it is merged into the base: ``W_t = W_0 + C_t``
with the running total ``C_t = C_{t−1} + ΔW_t`` (``C_0 = 0``). The server holds ``C_t`` per module,
as factors while they are smaller than the dense matrix (stacked rank below
``d_out d_in / (d_out + d_in)``), else dense (compute dtype).

What a client receives for round ``t + 1``: ``C_t`` (:meth:`FLoRAUpdate.base_delta`, the message's
base correction) and a fresh LoRA at its rank, ``B = 0`` and ``A`` seeded by run seed, round and
module (:func:`~flexlora_plugin.core.common_lora_A`; round 1 is every method's common start). The
client rebuilds ``W_0 + C_t`` from its untouched base, so it needs no state of its own: a pool
node serving any partition, a partition sampled in rounds 1 and 4, and a resumed run all start
from the same base. Clients train and send both factors.

``delta()`` is the round's ``ΔW_t``. Energy: 1 (every client holds ``C_t`` exactly). Export: the
peft adapter of ``C_T`` (the base-model change of the whole run), exact, or at a chosen rank with
its error. Bytes down grow with the run: ``C_t`` as factors is ``Σ_{rounds} Σ_k r_k`` rows and
columns, at most the dense ``d_out × d_in`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..engine import LowRankSum
from ..validation import ModuleInfo
from .base import GlobalUpdate, register_method

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["FLoRAUpdate", "accumulate"]

Correction = tuple[Tensor, Tensor] | Tensor  # (B : (d_out, R), A : (R, d_in)), or dense (d_out, d_in)


def accumulate(total: Correction | None, B_t: Tensor, A_t: Tensor, shape: tuple[int, int]) -> Correction:
    """``C_t = C_{t−1} + B_t A_t``: factors side by side while they are smaller than the dense matrix, else dense.

    Factors of rank ``R`` hold ``R (d_out + d_in)`` numbers, the matrix ``d_out d_in``: past
    ``R = d_out d_in / (d_out + d_in)`` (below ``min(d_out, d_in)``) the dense matrix is the
    smaller message and state, and as exact.
    """
    if isinstance(total, Tensor):
        return total + B_t @ A_t
    B, A = (B_t, A_t) if total is None else (torch.cat([total[0], B_t], dim=1), torch.cat([total[1], A_t], dim=0))
    d_out, d_in = shape
    return (B, A) if B.shape[1] * (d_out + d_in) < d_out * d_in else B @ A


@register_method("flora")
class FLoRAUpdate(GlobalUpdate):
    """FLoRA's global update: this round's exact stack ``ΔW_t`` and the running total ``C_t`` every client merges."""

    cumulative: ClassVar[bool] = True
    state_fields: ClassVar[Mapping[str, type]] = {"round": int}

    def __init__(
        self,
        info: Mapping[str, ModuleInfo],
        clients: Sequence[Hashable],
        excluded: Mapping[Hashable, str],
        *,
        steps: Mapping[str, tuple[Tensor, Tensor]],
        totals: Mapping[str, Correction],
        round: int,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(info, clients, excluded, compute_dtype=compute_dtype, device=device, seed=seed)
        self.steps = dict(steps)  # module -> (B_g, A_g) of this round (absent: no client held the module)
        self.totals = dict(totals)  # module -> C_t
        self.round = int(round)  # rounds aggregated so far; the next clients' fresh A is seeded by round + 1

    @classmethod
    def from_round(cls, rnd: Round) -> FLoRAUpdate:
        """``ΔW_t`` stacked per module, ``C_t = C_{t−1} + ΔW_t`` (modules no client held keep ``C_{t−1}``)."""
        previous = rnd.previous if isinstance(rnd.previous, FLoRAUpdate) else None
        info = {**(previous.info if previous else {}), **rnd.info}
        totals: dict[str, Correction] = dict(previous.totals) if previous else {}
        steps = {}
        for m in rnd.info:
            p, s = rnd.weights(m), rnd.scalings(m)
            steps[m] = rnd.weighted_sum(m, {k: p[k] * s[k] for k in p}).stacked()  # B_g, A_g: the exact stack
            totals[m] = accumulate(_to(totals.get(m), steps[m][0]), *steps[m], info[m].shape)
        o = rnd.options
        return cls(
            info,
            rnd.ids,
            rnd.excluded,
            steps=steps,
            totals=totals,
            round=(previous.round if previous else 0) + 1,
            compute_dtype=o.compute_dtype,
            device=o.device,
            seed=o.seed,
        )

    # ------------------------------------------------------------------ the rule
    def delta(self, module: str) -> Tensor:
        """The round's ``ΔW_t`` (zero for a module no client held)."""
        info = self._check_module(module)
        if module not in self.steps:
            return torch.zeros(info.shape, dtype=self.compute_dtype)
        B, A = self.steps[module]
        return B @ A

    def base_delta(self, module: str) -> Correction:
        """``C_t``: factors ``(B : (d_out, R), A : (R, d_in))`` or the dense matrix."""
        self._check_module(module)
        return self.totals[module]

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The fresh LoRA of the next round: ``A`` seeded by (seed, round + 1, module), ``B = 0``."""
        from ..start import common_lora_A  # start builds on the methods: imported when first used

        d_out, d_in = self.info[module].shape
        A = common_lora_A(module, r, d_in, seed=self.seed, round=self.round + 1)
        return A.to(dtype), torch.zeros(d_out, r, dtype=dtype)

    def _energy_kept(self, module: str, r: int) -> float:
        return 1.0  # every client holds C_t exactly, in its base

    # ------------------------------------------------------------------ state and export
    def _total_sum(self, module: str) -> LowRankSum:
        total = self.base_delta(module)
        if isinstance(total, Tensor):
            return LowRankSum.of_matrix(module, total, compute_dtype=self.compute_dtype, seed=self.seed)
        return LowRankSum.of_factors(module, *total, compute_dtype=self.compute_dtype, seed=self.seed)

    def state_tensors(self, module: str, max_rank: int | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``C_t`` (``C_B``/``C_A`` or ``C``) and this round's stack (``D_B``/``D_A``)."""
        total = self.base_delta(module)
        tensors = {"C": total} if isinstance(total, Tensor) else {"C_B": total[0], "C_A": total[1]}
        if module in self.steps:
            tensors["D_B"], tensors["D_A"] = self.steps[module]
        return tensors, {"round": self.round}

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
    ) -> FLoRAUpdate:
        totals: dict[str, Correction] = {m: t["C"] if "C" in t else (t["C_B"], t["C_A"]) for m, t in tensors.items()}
        steps = {m: (t["D_B"], t["D_A"]) for m, t in tensors.items() if "D_B" in t}
        rounds = {int(entries[m]["round"]) for m in tensors}
        return cls(
            info, clients, {}, steps=steps, totals=totals, round=max(rounds, default=0), compute_dtype=compute_dtype, seed=seed
        )

    def export_target(self, module: str) -> Tensor:
        """``C_T``, dense: the export is the running total every client merged, not the last round's update."""
        return self._total_sum(module).delta()

    def exact_rank(self, module: str, tol: float) -> int:
        """Smallest ``r ≥ 1`` reproducing ``C_T`` to ``tol`` (relative Frobenius), from its float64 spectrum."""
        return self._total_sum(module).exact_spectrum().rank_at(tol)

    def export_factors(self, module: str, r: int | None, scaling_of: Callable[[int], float], tol: float) -> tuple[Tensor, Tensor]:
        """``C_T``'s leading triplets: ``A = V_rᵀ``, ``B = U_r S_r / s_r``; ``r`` None: the rank reproducing it to ``tol``."""
        spec = self._total_sum(module).exact_spectrum()
        r = spec.rank_at(tol / 2) if r is None else min(r, spec.k)
        return spec.Vh[:r].to(self.compute_dtype), spec.b_factor(r, scaling_of(r)).to(self.compute_dtype)


def _to(total: Correction | None, like: Tensor) -> Correction | None:
    """``total`` on ``like``'s device and dtype (a restored total on the CPU, a round stacked on a device)."""
    if total is None:
        return None
    if isinstance(total, Tensor):
        return total.to(like)
    return total[0].to(like), total[1].to(like)
