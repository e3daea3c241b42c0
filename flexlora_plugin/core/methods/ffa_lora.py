"""FFA-LoRA: A frozen at one common start, only B trains and travels, B averaged exactly.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. Every client
freezes ``A`` at the federation's round-1 common ``A`` (:func:`~flexlora_plugin.core.common_lora_A`,
seeded by run seed and module, rounded once to the wire dtype) and trains only ``B``; only ``B``
travels, both ways, and each side regenerates ``A`` from the seed. A client of rank ``r_k`` holds
the first ``r_k`` rows of that one ``A``, so the weighted sum of the clients' products is itself
one product, exactly:

    Σ_k p_k s_k B_k A[:r_k] = B_g A[:R],   B_g = Σ_k p_k s_k pad(B_k)   (columns zero-padded to R),

``R`` the largest rank held. A client of rank ``r`` and scaling ``s_r`` receives
``B = B_g[:, :r] / s_r`` (its ``A`` is its own frozen ``A[:r]``), so ``s_r B A[:r]`` is ``ΔW``'s
first ``r`` columns' share. ``ΔW = B_g A[:R]`` (``delta()``); energy and export as for any
factored update: the share of ‖ΔW‖² the first ``r`` columns keep, and ``(A[:R], B_g / s_R)``.

The paper trains one rank for all clients. Mixed ranks are this toolkit's extension: the columns
``r..R`` only higher-rank clients hold receive no contribution from the others, so they shrink
by ``p_k`` each round relative to a homogeneous federation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from ..adapters import LORA_B
from ..errors import RankError
from .base import FactorsUpdate, register_method

if TYPE_CHECKING:
    from ..engine import Round

__all__ = ["FFALoRAUpdate"]


@register_method("ffa-lora")
class FFALoRAUpdate(FactorsUpdate):
    """FFA-LoRA's global update: ``B_g = Σ_k p_k s_k pad(B_k)`` on the common frozen ``A``; ``ΔW = B_g A``."""

    trains: ClassVar[tuple[str, ...]] = (LORA_B,)

    @classmethod
    def from_round(cls, rnd: Round) -> FFALoRAUpdate:
        o = rnd.options
        factors = {}
        for m, mi in rnd.info.items():
            p, s = rnd.weights(m), rnd.scalings(m)
            held = [c for c in rnd.clients if c.client in p]
            top = max(held, key=lambda c: c.factors[m].r).factors[m]  # its A is the common A[:R]
            B_g = torch.zeros(mi.shape[0], top.r, dtype=o.compute_dtype, device=o.device)
            for c in held:
                f = c.factors[m]
                B_g[:, : f.r] += (p[c.client] * s[c.client]) * f.B.to(device=o.device, dtype=o.compute_dtype)
            factors[m] = (top.A.to(device=o.device, dtype=o.compute_dtype), B_g)
        return cls.of_round(rnd, factors)  # type: ignore[return-value]

    def _project_module(self, module: str, r: int, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``A[:r]`` (the client's own frozen A) and ``B = B_g[:, :r] / s``, zero columns past ``R``."""
        A, B_g = self.factors[module]
        R = int(A.shape[0])
        if r > R:
            if r > min(self.info[module].shape):
                raise RankError(f"ffa-lora: module {module}: rank {r} exceeds min(d_out, d_in)={min(self.info[module].shape)}")
            from ..start import common_lora_A  # rows past R: no client of that rank replied; its A is still the common one

            A = common_lora_A(module, r, A.shape[1], seed=self.seed).to(device=A.device, dtype=A.dtype)
            B_g = torch.cat([B_g, B_g.new_zeros(B_g.shape[0], r - R)], dim=1)
        return A[:r].to(dtype), (B_g[:, :r] / scaling).to(dtype)
