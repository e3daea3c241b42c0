"""FedAvg of LoRA factors (McMahan et al., AISTATS 2017, applied to LoRA): homogeneous ranks only.

Every client of a module has the same rank ``r`` and scaling ``s``; the global factors are the
weighted means

    B̄ = Σ_k p_k B_k,   Ā = Σ_k p_k A_k,   ΔW = s · B̄ Ā,

and every client receives ``(B̄, Ā)`` itself. (``ΔW`` is not ``Σ_k p_k s B_k A_k``: the mean of
products is not the product of means; that gap is what FlexLoRA removes.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import RankError
from .base import FactorsUpdate, register_method

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["FedAvgUpdate"]


@register_method("fedavg")
class FedAvgUpdate(FactorsUpdate):
    """FedAvg of LoRA factors (homogeneous ranks only): ``ΔW = s · (Σ p_k B_k)(Σ p_k A_k)``."""

    @classmethod
    def from_round(cls, rnd: Round) -> FedAvgUpdate:
        o = rnd.options
        mixed = {}
        for m in rnd.info:
            ranks = {c.client: c.factors[m].r for c in rnd.clients if m in c.factors}
            if len(set(ranks.values())) > 1:
                mixed[m] = ranks
        if mixed:
            shown = "; ".join(f"{m}: {r}" for m, r in list(mixed.items())[:3])
            raise RankError(f"fedavg needs one rank per module, got mixed client ranks in {len(mixed)} module(s): {shown}")
        factors, scales = {}, {}
        for m in rnd.info:
            p = rnd.weights(m)
            held = [c for c in rnd.clients if c.client in p]
            s = {c.scalings[m] for c in held}
            if max(s) - min(s) > 1e-6 * max(s):
                raise RankError(f"fedavg needs one scaling per module; module {m} has {sorted(s)}")
            A = torch.stack([p[c.client] * c.factors[m].A.to(device=o.device, dtype=o.compute_dtype) for c in held]).sum(0)
            B = torch.stack([p[c.client] * c.factors[m].B.to(device=o.device, dtype=o.compute_dtype) for c in held]).sum(0)
            factors[m], scales[m] = (A, B), max(s)
        return cls.of_round(rnd, factors, scales)  # type: ignore[return-value]

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        A, B = self.factors[module]
        if r != A.shape[0]:
            raise RankError(f"fedavg: module {module} has rank {A.shape[0]}, a client of rank {r} cannot load it")
        return A.to(dtype), B.to(dtype)  # to the host, if on a device: GlobalUpdate._cached_projection
