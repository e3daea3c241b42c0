"""HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

Zero-padding and truncation. With ``√s_k`` moved into each factor, the factors are zero-padded to
the global rank ``R`` (``max_rank``, default the largest client rank) and averaged:

    B̄ = Σ_k w_k √s_k pad(B_k),   Ā = Σ_k w_k √s_k pad(A_k),   ΔW = B̄ Ā,

and a client of rank ``r`` and scaling ``s`` receives the truncation ``B = B̄[:, :r] / √s``,
``A = Ā[:r] / √s`` (not an SVD). ``w_k`` is ``p_k`` (``hetlora_weighting="data"``) or
``‖s_k B_k A_k‖_F`` normalised (``"norm"``, the paper's). HetLoRA's local rank self-pruning is a
client-side training rule and is not part of this method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import RankError
from ..validation import ClientUpdate
from .base import FactorsUpdate, _frob2, register_method

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["HetLoRAUpdate", "PaddedUpdate", "padded_rank", "padded_sum"]


def padded_sum(
    held: Sequence[ClientUpdate], module: str, w: Sequence[float], R: int, shape: tuple[int, int], rnd: Round
) -> tuple[Tensor, Tensor]:
    """``(Ā : (R, d_in), B̄ : (d_out, R))`` with ``Ā[:r_k] += w_k √s_k A_k`` and ``B̄[:, :r_k] += w_k √s_k B_k``."""
    o = rnd.options
    A = torch.zeros(R, shape[1], dtype=o.compute_dtype, device=o.device)
    B = torch.zeros(shape[0], R, dtype=o.compute_dtype, device=o.device)
    for c, w_k in zip(held, w, strict=True):
        f, root = c.factors[module], math.sqrt(c.scalings[module])
        A[: f.r] += (w_k * root) * f.A.to(device=o.device, dtype=o.compute_dtype)
        B[:, : f.r] += (w_k * root) * f.B.to(device=o.device, dtype=o.compute_dtype)
    return A, B


def padded_rank(rnd: Round, method: str) -> int:
    """The global rank ``R``: ``max_rank``, default the largest client rank; a client sending more raises."""
    top = max(f.r for c in rnd.clients for f in c.factors.values())
    R = rnd.options.max_rank if rnd.options.max_rank is not None else top
    if top > R:
        raise RankError(f"{method}: a client sent rank {top}, above max_rank={R}")
    return R


class PaddedUpdate(FactorsUpdate):
    """Global factors padded to rank ``R``, ``ΔW = B̄ Ā`` (``√s_k`` inside); a client receives their truncation."""

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        A, B = self.factors[module]
        if r > A.shape[0]:
            raise RankError(f"{self.method}: module {module} is padded to rank {A.shape[0]}, rank {r} was requested")
        root = math.sqrt(scaling)
        return (A[:r] / root).to(dtype), (B[:, :r] / root).to(dtype)


@register_method("hetlora")
class HetLoRAUpdate(PaddedUpdate):
    """HetLoRA: zero-padded, scale-aligned factor averaging; projection by truncation."""

    @classmethod
    def from_round(cls, rnd: Round) -> HetLoRAUpdate:
        o = rnd.options
        if o.hetlora_weighting not in ("data", "norm"):
            raise ValueError(f"hetlora_weighting must be 'data' or 'norm', got {o.hetlora_weighting!r}")
        R = padded_rank(rnd, cls.method)
        factors = {}
        for m, mi in rnd.info.items():
            held = [c for c in rnd.clients if m in c.factors]
            w = _weights(held, m, rnd)
            factors[m] = padded_sum(held, m, w, min(R, min(mi.shape)), mi.shape, rnd)
        return cls.of_round(rnd, factors)  # type: ignore[return-value]


def _weights(held: Sequence[ClientUpdate], module: str, rnd: Round) -> list[float]:
    """Normalised weights; ``"norm"``: ``‖s_k B_k A_k‖_F``, equal weights if every update is zero."""
    if rnd.options.hetlora_weighting == "data":
        p = rnd.weights(module)
        return [p[c.client] for c in held]
    raw = []
    for c in held:
        f = c.factors[module]
        o = rnd.options
        norm2 = _frob2(f.B.to(device=o.device, dtype=o.compute_dtype), f.A.to(device=o.device, dtype=o.compute_dtype))
        raw.append(c.scalings[module] * math.sqrt(max(norm2, 0.0)))
    total = sum(raw)
    if total == 0.0:  # every client sent a zero update (e.g. all B = 0 at round 0)
        return [1.0 / len(held)] * len(held)
    return [x / total for x in raw]
