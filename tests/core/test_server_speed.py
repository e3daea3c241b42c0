"""The server step as users call it: any order of ranks, and the stacked (device) layout.

References are independent: float64 einsum ΔW and ``torch.linalg.svdvals`` (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import aggregate
from flexlora_plugin.core import aggregation as agg_mod
from flexlora_plugin.core.errors import FlexLoRAWarning, MagnitudeError
from flexlora_plugin.core.staging import stage
from flexlora_plugin.core.terms import TermList
from tests.conftest import best_rank_error, make_client, ref_delta

# square, tall and wide; stacked rank 24 + 24 + 12 + 8 = 68 > min(d) = 64: the dense (Gram) path
SHAPES = {"l0.q_proj": (64, 64), "l0.gate_proj": (96, 64), "l0.down_proj": (64, 96)}
RANKS = [24, 24, 12, 8]


def _states(gen, dtype=torch.float32):
    return [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen, dtype=dtype) for r in RANKS]


def _gap(proj, states, weights, module, r):
    ref = ref_delta(states, weights, module, [16.0] * len(states))
    A, B = proj[f"{module}.lora_A.weight"].double(), proj[f"{module}.lora_B.weight"].double()
    err = float((ref - (16.0 / r) * B @ A).norm())
    return (err - best_rank_error(ref, r)) / float(ref.norm())


class _Counter:
    """Counts ΔW accumulations (TermList.delta) and decompositions (dense_spectrum) per module."""

    def __init__(self, monkeypatch):
        self.deltas: dict[tuple[int, ...], int] = {}
        self.decompositions = 0
        real_delta, real_dense = TermList.delta, agg_mod.dense_spectrum

        def delta(terms, dtype, device):
            self.deltas[terms.shape] = self.deltas.get(terms.shape, 0) + 1
            return real_delta(terms, dtype, device)

        def dense(*args, **kwargs):
            self.decompositions += 1
            return real_dense(*args, **kwargs)

        monkeypatch.setattr(TermList, "delta", delta)
        monkeypatch.setattr(agg_mod, "dense_spectrum", dense)


@pytest.mark.parametrize("order", [(8, 12, 24), (24, 12, 8), (12, 24, 8)])
def test_default_call_decomposes_each_module_once_in_any_order(gen, monkeypatch, order):
    states, weights = _states(gen), [3.0, 1.0, 2.0, 5.0]
    count = _Counter(monkeypatch)
    update = aggregate(states, weights, lora_alpha=16)  # no max_rank, as a user calls it
    for r in order:
        proj = update.project(r, lora_alpha=16)
        for m in SHAPES:
            assert _gap(proj, states, weights, m, r) <= 1e-5, (m, r)
    assert count.decompositions == len(SHAPES)
    assert set(count.deltas.values()) == {1}


def test_rank_above_every_client_rank_is_served_from_the_kept_basis(gen, monkeypatch):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    count = _Counter(monkeypatch)
    update = aggregate(states, weights, lora_alpha=16)
    update.project(8, lora_alpha=16)  # decomposes for the largest client rank, 24
    proj = update.project(30, lora_alpha=16)  # above it: a Ritz step on the factors, no new ΔW
    for m in SHAPES:
        assert _gap(proj, states, weights, m, 30) <= 1e-5, m
    assert count.decompositions == len(SHAPES) and set(count.deltas.values()) == {1}


def test_max_rank_keeps_no_basis_and_recomputes_beyond_it(gen, monkeypatch):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    count = _Counter(monkeypatch)
    update = aggregate(states, weights, lora_alpha=16, max_rank=8)
    update.project(8, lora_alpha=16)
    assert update._bases == {}  # the documented trade: less kept, a later larger rank costs a new decomposition
    proj = update.project(20, lora_alpha=16)
    assert count.decompositions == 2 * len(SHAPES)
    for m in SHAPES:
        assert _gap(proj, states, weights, m, 20) <= 1e-5, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_layout_matches_the_client_list(gen, dtype):
    states, weights = _states(gen, dtype), [3.0, 1.0, 2.0, 5.0]
    plain = aggregate(states, weights, lora_alpha=16)
    stacked = aggregate(states, weights, lora_alpha=16, device="cpu", stack_on_device=True)
    assert type(stacked._terms["l0.q_proj"]).__name__ == "StackedTerms"
    for m in SHAPES:
        ref = ref_delta(states, weights, m, [16.0] * 4)
        assert torch.allclose(stacked.delta(m).double(), ref, atol=1e-5 * float(ref.abs().max()))
    for r in (4, 24, 30):  # 30 > every client rank: the Ritz step through StackedTerms.matmul/rmatmul
        a, b = plain.project(r, lora_alpha=16), stacked.project(r, lora_alpha=16)
        for key in a:
            assert a[key].dtype == b[key].dtype == dtype
        for m in SHAPES:
            assert _gap(b, states, weights, m, r) <= (1e-5 if dtype == torch.float32 else 1e-2), (m, r)


def test_stacked_factored_path_is_exact(gen):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (2, 5, 3)]
    update = aggregate(states, [1.0, 2.0, 3.0], lora_alpha=16, device="cpu", stack_on_device=True)
    assert update.uses_factored_path("l0.q_proj")
    proj = update.project(4, lora_alpha=16)
    for m in SHAPES:
        assert _gap(proj, states, [1.0, 2.0, 3.0], m, 4) <= 1e-5


def test_stage_keeps_client_order_and_mixed_dtypes(gen):
    A1, B1 = torch.randn(2, 5, generator=gen), torch.randn(7, 2, generator=gen)
    A2, B2 = torch.randn(3, 5, generator=gen).bfloat16(), torch.randn(7, 3, generator=gen).bfloat16()
    stacks = stage({"x": {"m": (A1, B1)}, "y": {"m": (A2, B2)}, "z": {}}, ["m"], "cpu")
    st = stacks["m"]
    assert st.clients == ("x", "y") and st.ranks == (2, 3)
    assert st.A_cat.dtype == torch.float32 and st.A_cat.shape == (5, 5) and st.B_cat.shape == (7, 5)
    assert torch.equal(st.views()["y"][0], A2.float()) and torch.equal(st.views()["y"][1], B2.float())
    assert torch.equal(st.select({"y"}).B_cat, B2.float())


def _hostile(gen):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    states[1] = dict(states[1])
    key = "l0.gate_proj.lora_B.weight"
    states[1][key] = states[1][key].clone()
    states[1][key][3, 2] = math.nan
    states[2] = {k: v * 1e4 for k, v in states[2].items()}
    return states, weights


def test_stacked_value_checks_exclude_as_the_host_path_does(gen):
    states, weights = _hostile(gen)
    with pytest.warns(FlexLoRAWarning):
        plain = aggregate(states, weights, lora_alpha=16, on_invalid="exclude", max_norm=1e6)
    with pytest.warns(FlexLoRAWarning):
        stacked = aggregate(states, weights, lora_alpha=16, on_invalid="exclude", max_norm=1e6, device="cpu", stack_on_device=True)
    assert plain.excluded == stacked.excluded
    assert set(stacked.excluded) == {1, 2} and "NaN/Inf) in module l0.gate_proj" in stacked.excluded[1]
    assert "above the bound" in stacked.excluded[2]
    assert stacked.clients == (0, 3)
    kept = [states[0], states[3]]
    for m in SHAPES:
        ref = ref_delta(kept, [1.0, 1.0], m, [16.0, 16.0])
        assert torch.allclose(stacked.delta(m).double(), ref, atol=1e-5 * float(ref.abs().max()))


def test_a_module_held_only_by_an_excluded_client_is_dropped_as_on_the_host(gen):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    extra = {"l1.k_proj.lora_A.weight": torch.full((2, 8), math.nan), "l1.k_proj.lora_B.weight": torch.ones(8, 2)}
    states[1] = {**states[1], **extra}  # the only client with l1.k_proj, and it is non-finite
    with pytest.warns(FlexLoRAWarning):
        plain = aggregate(states, weights, lora_alpha=16, on_invalid="exclude")
    with pytest.warns(FlexLoRAWarning):
        stacked = aggregate(states, weights, lora_alpha=16, on_invalid="exclude", device="cpu", stack_on_device=True)
    assert plain.modules == stacked.modules == tuple(SHAPES) and plain.excluded == stacked.excluded
    assert stacked.project(24, lora_alpha=16).keys() == plain.project(24, lora_alpha=16).keys()


def test_stacked_value_checks_raise_on_request(gen):
    states, weights = _hostile(gen)
    states[1] = _states(gen)[1]  # only the too-large client is left
    with pytest.raises(MagnitudeError, match="client 2"):
        aggregate(states, weights, lora_alpha=16, max_norm=1e6, device="cpu", stack_on_device=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pipeline_matches_the_cpu(gen):
    states, weights = _hostile(gen)
    with pytest.warns(FlexLoRAWarning):
        cpu = aggregate(states, weights, lora_alpha=16, on_invalid="exclude", max_norm=1e6)
    with pytest.warns(FlexLoRAWarning):
        cuda = aggregate(states, weights, lora_alpha=16, on_invalid="exclude", max_norm=1e6, device="cuda")
    assert cpu.excluded == cuda.excluded
    kept = [states[0], states[3]]
    for r in (4, 24, 30):
        proj = cuda.project(r, lora_alpha=16)
        assert all(t.device.type == "cpu" for t in proj.values())
        for m in SHAPES:
            assert _gap(proj, kept, [1.0, 1.0], m, r) <= 1e-5, (m, r)

