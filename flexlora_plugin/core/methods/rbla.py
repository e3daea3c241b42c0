"""RBLA (Chen et al., "RBLA: Rank-Based-LoRA-Aggregation for Fine-tuning Heterogeneous Models in FLaaS", arXiv 2408.08699).

Rank-based averaging. With ``√s_k`` moved into each factor as in HetLoRA, row ``j`` of ``A`` (and
column ``j`` of ``B``) is averaged over the clients that hold it, ``r_k > j``, not padded with
zeros for those that do not:

    Ā[j] = Σ_{k: r_k > j} p_k √s_k A_k[j] / Σ_{k: r_k > j} p_k,
    B̄[:, j] = Σ_{k: r_k > j} p_k √s_k B_k[:, j] / Σ_{k: r_k > j} p_k,   ΔW = B̄ Ā,

for ``j < R`` (``max_rank``, default the largest client rank, capped at ``min(d_out, d_in)``);
rows no client holds stay zero. A client of rank ``r`` and scaling ``s`` receives the truncation
``A = Ā[:r] / √s``, ``B = B̄[:, :r] / √s``. A single client of the highest rank alone sets the rows
no other client holds, whatever its weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import register_method
from .hetlora import PaddedUpdate, padded_rank, padded_sum

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["RBLAUpdate"]


@register_method("rbla")
class RBLAUpdate(PaddedUpdate):
    """RBLA: each factor row averaged over the clients holding it; projection by truncation."""

    @classmethod
    def from_round(cls, rnd: Round) -> RBLAUpdate:
        o = rnd.options
        R = padded_rank(rnd, cls.method)
        factors = {}
        for m, mi in rnd.info.items():
            p = rnd.weights(m)
            held = [c for c in rnd.clients if m in c.factors]
            R_m = min(R, min(mi.shape))
            A, B = padded_sum(held, m, [p[c.client] for c in held], R_m, mi.shape, rnd)  # Σ_{k: r_k > j} p_k √s_k ·
            holders = torch.zeros(R_m, dtype=torch.float64)  # Σ_{k: r_k > j} p_k
            for c in held:
                holders[: c.factors[m].r] += p[c.client]
            holders[holders == 0] = 1.0  # rows no client holds stay zero
            holders = holders.to(device=o.device, dtype=o.compute_dtype)
            factors[m] = (A / holders[:, None], B / holders)
        return cls.of_round(rnd, factors)  # type: ignore[return-value]
