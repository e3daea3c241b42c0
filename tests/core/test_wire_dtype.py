"""The wire dtype (``FlexLoRAConfig.wire_dtype``): what both hosts send, against float64 references."""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import FlexLoRAConfig, module_infos, state_nbytes, to_wire
from flexlora_plugin.core.federation import Federation, Reply
from tests.conftest import best_rank_error, make_client, ref_delta

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}
PREFIX = "base_model.model."
ALPHA = 16.0
RANKS = {"a": 4, "b": 8, "c": 12}
BF16_EPS = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)


def test_to_wire_casts_or_passes_through():
    state = {"m.lora_A.weight": torch.randn(2, 5), "m.lora_B.weight": torch.randn(3, 2)}
    same = to_wire(state, "auto")
    assert all(same[k] is v for k, v in state.items())  # nothing copied
    half = to_wire(state, "bfloat16")
    assert {v.dtype for v in half.values()} == {torch.bfloat16}
    assert state_nbytes(half) * 2 == state_nbytes(state)
    for k, v in state.items():
        assert torch.equal(half[k], v.to(torch.bfloat16))
    assert to_wire(half, "float32")["m.lora_A.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match=r"wire_dtype must be one of \['auto', 'bfloat16', 'float32'\], got 'fp8'"):
        to_wire(state, "fp8")
    with pytest.raises(ValueError, match="wire_dtype must be one of"):
        FlexLoRAConfig(wire_dtype="float16")


def _round(wire_dtype: str) -> tuple[Federation, dict[str, Reply]]:
    """One round of three clients whose replies arrive in the wire dtype."""
    fed = Federation(FlexLoRAConfig(lora_alpha=ALPHA, wire_dtype=wire_dtype), module_infos(SHAPES), shapes=SHAPES)
    for client, r in RANKS.items():
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    gen = torch.Generator().manual_seed(0)
    shapes = {PREFIX + m: s for m, s in SHAPES.items()}
    replies = {
        c: Reply(to_wire(make_client({PREFIX + m: r for m in SHAPES}, shapes, gen=gen), wire_dtype), n, 1.0)
        for (c, r), n in zip(RANKS.items(), (10, 30, 60))
    }
    assert fed.aggregate(replies).updated
    return fed, replies


def test_bfloat16_both_ways_halves_the_bytes_and_stays_within_its_rounding():
    fed32, replies32 = _round("float32")
    fed16, replies16 = _round("bfloat16")
    assert all(v.dtype == torch.bfloat16 for r in replies16.values() for v in r.state.values())
    states16 = [r.state for r in replies16.values()]
    for client, r in RANKS.items():
        sent32, sent16 = fed32.factors_for(client), fed16.factors_for(client)
        assert {v.dtype for v in sent16.values()} == {torch.bfloat16}
        assert state_nbytes(sent16) * 2 == state_nbytes(sent32)
        for module in SHAPES:
            # the server aggregates the bf16 replies exactly (float64 reference from the same bf16 values) ...
            ref = ref_delta(states16, [10, 30, 60], PREFIX + module, [ALPHA] * 3)
            A = sent16[f"{PREFIX}{module}.lora_A.weight"].double()
            B = sent16[f"{PREFIX}{module}.lora_B.weight"].double()
            err = float((ref - (ALPHA / r) * B @ A).norm())
            # ... and only the rounding of the sent factors to bf16 separates them from the best rank-r
            # approximation: ‖ΔB‖ ≤ u‖B‖, ‖ΔA‖ ≤ u‖A‖_F with A's r orthonormal rows
            bound = BF16_EPS * (1 + r**0.5) * float(ref.norm())
            assert err - best_rank_error(ref, r) <= bound, (client, module)
            assert err - best_rank_error(ref, r) > 1e-9 * float(ref.norm())  # really rounded: not the float32 factors


def test_auto_sends_the_adapters_own_dtype():
    fed, _ = _round("auto")
    assert {v.dtype for v in fed.factors_for("a").values()} == {torch.float32}
