"""rbla against a float64 reference written from its equation (arXiv 2408.08699), never the code under test."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import FlexLoRAConfig, RankError, aggregate, list_methods, load_server_state, save_server_state
from flexlora_plugin.core.export import PEFT_PREFIX, export_adapter
from tests.conftest import make_client

ALPHA = 16.0
SHAPES = {"m.q_proj": (12, 10), "m.v_proj": (10, 16)}
RANKS = (2, 4, 8)
WEIGHTS = [3.0, 1.0, 2.0]
R = max(RANKS)


@pytest.fixture
def states(gen):
    out = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in RANKS]
    del out[2]["m.v_proj.lora_A.weight"], out[2]["m.v_proj.lora_B.weight"]  # the rank-8 client misses v_proj
    return out


def reference(states, weights, module):
    """``(A_g : (R, d_in), B_g : (d_out, R))``: row j averaged over the holders of row j, √s_k inside."""
    d_out, d_in = SHAPES[module]
    a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    held = [(w, s[a].double(), s[b].double()) for w, s in zip(weights, states) if a in s]  # clients holding the module
    total = sum(w for w, _, _ in held)
    A_g = torch.zeros(R, d_in, dtype=torch.float64)
    B_g = torch.zeros(d_out, R, dtype=torch.float64)
    for j in range(R):
        rows = [(w / total, A, B) for w, A, B in held if A.shape[0] > j]  # clients with r_k > j
        norm = sum(p for p, _, _ in rows)
        for p, A, B in rows:
            root = math.sqrt(ALPHA / A.shape[0])  # √s_k, s_k = alpha / r_k
            A_g[j] += p * root * A[j] / norm
            B_g[:, j] += p * root * B[:, j] / norm
    return A_g, B_g


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_rbla_matches_equation(states, dtype, tol):
    assert "rbla" in list_methods()
    update = aggregate(states, WEIGHTS, method="rbla", lora_alpha=ALPHA, compute_dtype=dtype)
    for m in SHAPES:
        A_g, B_g = reference(states, WEIGHTS, m)
        assert rel(update.delta(m), torch.einsum("oj,ji->oi", B_g, A_g)) < tol
        for r in (2, 4, 8):
            proj = update.project(r, lora_alpha=ALPHA, dtype=torch.float64)
            root = math.sqrt(ALPHA / r)
            assert rel(proj[f"{m}.lora_A.weight"], A_g[:r] / root) < tol
            assert rel(proj[f"{m}.lora_B.weight"], B_g[:, :r] / root) < tol
    # one rank-8 client alone sets rows 4..7 of q_proj, whatever its weight; nobody holds them in v_proj
    A8 = states[2]["m.q_proj.lora_A.weight"].double()
    assert rel(update.factors["m.q_proj"][0][4:], math.sqrt(ALPHA / 8) * A8[4:]) < tol
    assert not update.factors["m.v_proj"][0][4:].any() and not update.factors["m.v_proj"][1][:, 4:].any()


def test_rbla_state_roundtrip_export_and_stacked(states, tmp_path):
    update = aggregate(states, WEIGHTS, method="rbla", lora_alpha=ALPHA)
    back = load_server_state(save_server_state(tmp_path / "s.safetensors", update, round=1)).update
    assert back.method == "rbla"
    stacked = aggregate(states, WEIGHTS, method="rbla", lora_alpha=ALPHA, device="cpu", stack_on_device=True)
    for r in (2, 4, 8):
        want = update.project(r, lora_alpha=ALPHA)
        for other in (back, stacked):
            got = other.project(r, lora_alpha=ALPHA)
            assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-7) for k in want)
    tensors, ranks = export_adapter(update, lora_alpha=ALPHA)
    for m in SHAPES:
        A, B = tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"].double(), tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"].double()
        assert rel(ALPHA / ranks[m] * B @ A, update.delta(m).double()) < 1e-5


def test_rbla_refuses_ranks_above_R(states):
    with pytest.raises(RankError, match="rbla: a client sent rank 8, above max_rank=4"):
        aggregate(states, WEIGHTS, method="rbla", lora_alpha=ALPHA, max_rank=4)
    with pytest.raises(RankError, match="rbla: module m.q_proj is padded to rank 8, rank 9 was requested"):
        aggregate(states, WEIGHTS, method="rbla", lora_alpha=ALPHA).project(9, lora_alpha=ALPHA)


def test_rbla_pads_to_the_largest_client_rank_not_hetlora_max_rank():
    cfg = FlexLoRAConfig(method="rbla", hetlora_max_rank=3)
    assert cfg.aggregate_kwargs(client_max_rank=8)["max_rank"] == 8
