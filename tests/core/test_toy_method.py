"""A method written the way docs/api.md shows, with documented names only, runs on both placements.

Two toy methods: one built on ``rnd.weighted_sum`` (served by truncated SVD, FlexLoRA's hooks),
one reading each client's factors (``rnd.clients``) into global factors (FactorsUpdate). Each is
checked against a float64 reference written here from its equation, on the CPU path and with the
factors stacked (``stack_on_device=True``, the CUDA layout, here on the CPU).
"""

from __future__ import annotations

import pytest
import torch

import flexlora_plugin.core as core
from flexlora_plugin.core import FactorsUpdate, FlexLoRAUpdate, aggregate, list_methods, register_method
from tests.conftest import best_rank_error, make_client

SHAPES = {"l0.q_proj": (24, 20), "l0.down_proj": (20, 36)}
RANKS = [2, 4, 8]
ALPHA = 16.0


@register_method("toy-uniform-svd")
class UniformFlexLoRA(FlexLoRAUpdate):
    """FlexLoRA with equal client weights: ΔW = (1/K) Σ_k s_k B_k A_k."""

    @classmethod
    def from_round(cls, rnd):
        sums = {}
        for m in rnd.info:
            s = rnd.scalings(m)
            sums[m] = rnd.weighted_sum(m, {k: s_k / len(s) for k, s_k in s.items()})
        return cls(rnd.info, rnd.ids, rnd.excluded, sums=sums, stats=rnd.stats, seed=rnd.options.seed)


@register_method("toy-largest")
class LargestClient(FactorsUpdate):
    """Every client receives the largest-rank client's own product: ΔW = s_K B_K A_K, truncated."""

    @classmethod
    def from_round(cls, rnd):
        factors, scales = {}, {}
        for m in rnd.info:
            top = max((c for c in rnd.clients if m in c.factors), key=lambda c: c.factors[m].r)
            f = top.factors[m]
            factors[m] = (f.A.to(rnd.options.compute_dtype), f.B.to(rnd.options.compute_dtype))
            scales[m] = top.scalings[m]
        return cls(rnd.info, rnd.ids, rnd.excluded, factors=factors, scales=scales, seed=rnd.options.seed)

    def _project_module(self, module, r, scaling, dtype):
        A, B = self.factors[module]
        return A[:r].to(dtype), (B[:, :r] * (self.scales[module] / scaling)).to(dtype)


def _states(gen):
    return [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in RANKS]


def _uniform_reference(states, module):
    """(1/K) Σ_k (alpha / r_k) B_k A_k in float64."""
    out = 0
    for s in states:
        A, B = s[f"{module}.lora_A.weight"].double(), s[f"{module}.lora_B.weight"].double()
        out = out + (ALPHA / A.shape[0]) / len(states) * torch.einsum("or,ri->oi", B, A)
    return out


def test_the_toy_methods_use_only_documented_names():
    for name in ("FlexLoRAUpdate", "FactorsUpdate", "Round", "LowRankSum", "aggregate", "register_method"):
        assert name in core.__all__, name
    assert {"toy-uniform-svd", "toy-largest"} <= set(list_methods())


@pytest.mark.parametrize("stacked", [False, True])
def test_a_weighted_sum_method_is_exact_on_both_placements(gen, stacked):
    states = _states(gen)
    update = aggregate(states, [1.0, 5.0, 9.0], method="toy-uniform-svd", lora_alpha=ALPHA, device="cpu", stack_on_device=stacked)
    assert update.method == "toy-uniform-svd"
    for m in SHAPES:
        ref = _uniform_reference(states, m)
        assert float((update.delta(m).double() - ref).norm() / ref.norm()) <= 1e-6, m
        for r in (3, 8, 12):
            proj = update.project(r, lora_alpha=ALPHA)
            A, B = proj[f"{m}.lora_A.weight"].double(), proj[f"{m}.lora_B.weight"].double()
            err = float((ref - (ALPHA / r) * B @ A).norm())
            assert err - best_rank_error(ref, r) <= 1e-5 * float(ref.norm()), (m, r)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_method_reading_client_factors_gets_them_on_both_placements(gen, stacked):
    states = _states(gen)
    update = aggregate(states, [1.0, 5.0, 9.0], method="toy-largest", lora_alpha=ALPHA, device="cpu", stack_on_device=stacked)
    for m in SHAPES:
        A, B = states[-1][f"{m}.lora_A.weight"].double(), states[-1][f"{m}.lora_B.weight"].double()
        ref = (ALPHA / 8) * B @ A
        assert float((update.delta(m).double() - ref).norm() / ref.norm()) <= 1e-6, m
        proj = update.project(4, lora_alpha=ALPHA)
        got = (ALPHA / 4) * proj[f"{m}.lora_B.weight"].double() @ proj[f"{m}.lora_A.weight"].double()
        want = (ALPHA / 8) * B[:, :4] @ A[:4]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), m


def test_a_duplicate_method_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_method("toy-largest")(type("Again", (LargestClient,), {}))
