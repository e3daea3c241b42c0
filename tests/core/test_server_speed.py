"""The server step as users call it: any order of ranks, and the stacked (device) layout.

References are independent: float64 einsum ΔW and ``torch.linalg.svdvals`` (tests/conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import aggregate, staging
from flexlora_plugin.core import terms as terms_mod
from flexlora_plugin.core.errors import FlexLoRAWarning, MagnitudeError
from flexlora_plugin.core.projection import Gram, gram_basis
from flexlora_plugin.core.staging import stage
from flexlora_plugin.core.terms import TermList
from tests.conftest import make_client, projection_gap, ref_delta

# square, tall and wide; stacked rank 24 + 24 + 12 + 8 = 68 > min(d) = 64: the dense (Gram) path
SHAPES = {"l0.q_proj": (64, 64), "l0.gate_proj": (96, 64), "l0.down_proj": (64, 96)}
RANKS = [24, 24, 12, 8]


def _states(gen, dtype=torch.float32):
    return [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen, dtype=dtype) for r in RANKS]


class _Counter:
    """Per module shape, what ``update.stats`` (EngineStats, public) counted: ΔW formations, Grams from
    slabs, decompositions."""

    def __init__(self, update):
        stats, shape = update.stats, {m: update.info[m].shape for m in update.modules}
        self.deltas = {shape[m]: n for m, n in stats.deltas.items() if n}
        self.slab_grams = {shape[m]: n for m, n in stats.slab_grams.items() if n}
        self.decompositions = sum(stats.decompositions.values())


@pytest.mark.parametrize("order", [(8, 12, 24), (24, 12, 8), (12, 24, 8)])
def test_default_call_decomposes_each_module_once_in_any_order(gen, order):
    states, weights = _states(gen), [3.0, 1.0, 2.0, 5.0]
    update = aggregate(states, weights, lora_alpha=16)  # no max_rank, as a user calls it
    for r in order:
        proj = update.project(r, lora_alpha=16)
        for m in SHAPES:
            assert projection_gap(proj, states, weights, m, r) <= 1e-5, (m, r)
    count = _Counter(update)
    assert count.decompositions == len(SHAPES)
    assert set(count.deltas.values()) == {1}


def test_rank_above_every_client_rank_is_served_from_the_kept_basis(gen):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    update = aggregate(states, weights, lora_alpha=16)
    update.project(8, lora_alpha=16)  # decomposes for the largest client rank, 24
    proj = update.project(30, lora_alpha=16)  # above it: a Ritz step on the factors, no new ΔW
    for m in SHAPES:
        assert projection_gap(proj, states, weights, m, 30) <= 1e-5, m
    count = _Counter(update)
    assert count.decompositions == len(SHAPES) and set(count.deltas.values()) == {1}


def test_max_rank_keeps_no_basis_and_recomputes_beyond_it(gen):
    states, weights = _states(gen), [1.0, 1.0, 1.0, 1.0]
    update = aggregate(states, weights, lora_alpha=16, max_rank=8)
    update.project(8, lora_alpha=16)
    assert _Counter(update).decompositions == len(SHAPES)
    proj = update.project(20, lora_alpha=16)  # the documented trade: no basis kept, so a new decomposition
    count = _Counter(update)
    assert count.decompositions == 2 * len(SHAPES)
    for m in SHAPES:
        assert projection_gap(proj, states, weights, m, 20) <= 1e-5, m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_rank_on_the_cpu_never_forms_a_dense_delta(gen, dtype):
    states, weights = _states(gen, dtype), [3.0, 1.0, 2.0, 5.0]
    update = aggregate(states, weights, lora_alpha=16, max_rank=24)  # 24 < 0.4 · 64: the Gram path
    for r in (8, 12, 24):
        proj = update.project(r, lora_alpha=16)
        for m in SHAPES:
            assert projection_gap(proj, states, weights, m, r) <= (1e-5 if dtype == torch.float32 else 1e-2), (m, r)
    count = _Counter(update)
    assert count.deltas == {} and set(count.slab_grams.values()) == {1}
    assert count.decompositions == len(SHAPES)
    for m in SHAPES:
        ref = torch.linalg.svdvals(ref_delta(states, weights, m, [16.0] * 4))[:24]
        assert torch.allclose(update.spectrum(m, 24).S.double(), ref, rtol=1e-4 if dtype == torch.float32 else 1e-2), m
        total = float(ref_delta(states, weights, m, [16.0] * 4).square().sum())
        assert update.spectrum(m, 24).total_energy == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_delta_batches_clients_into_larger_gemms_and_matches_the_sum(gen, dtype):
    """TermList.delta stacks consecutive clients up to an inner size of 24 here (512 by default); a
    rank above it stays alone. Checked against the float64 einsum of the same terms."""
    ranks = [8, 8, 8, 30, 4, 12, 8, 2]
    items = [(0.5 + j, torch.randn(40, r, generator=gen), torch.randn(r, 56, generator=gen)) for j, r in enumerate(ranks)]
    assert [[int(A.shape[0]) for _, _, A in b] for b in terms_mod._batches(items, 24)] == [[8, 8, 8], [30], [4, 12, 8], [2]]
    ref = sum(c * torch.einsum("ir,rj->ij", B.double(), A.double()) for c, B, A in items)
    out = TermList(items, (40, 56)).delta(dtype, None, batch_k=24)
    assert out.dtype == dtype
    assert torch.allclose(out.double(), ref, rtol=0, atol=(1e-5 if dtype == torch.float32 else 1e-12) * float(ref.abs().max()))


@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 96)])
@pytest.mark.parametrize("block_bytes", [4 << 20, 4 * 64 * 7])  # one slab; slabs of 7 (the last one shorter)
def test_gram_from_slabs_matches_the_dense_gram(gen, shape, block_bytes):
    d_out, d_in = shape
    items = [
        (c, torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen))
        for c, r in ((0.5, 20), (-1.5, 30), (2.0, 25))
    ]
    gram = TermList(items, shape).gram(torch.float32, None, block_bytes=block_bytes)
    dense = sum(c * B.double() @ A.double() for c, B, A in items)
    ref = dense @ dense.T if d_out <= d_in else dense.T @ dense
    assert gram.wide == (d_out <= d_in) and gram.matrix.shape == ref.shape
    assert torch.allclose(gram.matrix.double(), ref, atol=1e-5 * float(ref.abs().max()))
    assert gram.total_energy == pytest.approx(float(dense.square().sum()), rel=1e-6)


def test_top_k_eigenvectors_match_the_full_decomposition(gen):
    X = torch.randn(80, 300, generator=gen, dtype=torch.float64)
    G = X @ X.T
    vals, vecs = torch.linalg.eigh(G)
    gram = Gram(matrix=G.clone(), wide=True, shape=(80, 300), total_energy=float(X.square().sum()))
    basis = gram_basis(gram, 7)
    assert basis.vecs.shape == (80, 7)
    # the same leading-first directions, up to sign
    assert torch.allclose((basis.vecs.T @ vecs.flip(1)[:, :7]).abs().diagonal(), torch.ones(7, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(basis.vecs.T @ basis.vecs, torch.eye(7, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_layout_matches_the_client_list(gen, dtype):
    states, weights = _states(gen, dtype), [3.0, 1.0, 2.0, 5.0]
    plain = aggregate(states, weights, lora_alpha=16)
    stacked = aggregate(states, weights, lora_alpha=16, device="cpu", stack_on_device=True)
    assert type(stacked.sums["l0.q_proj"].terms).__name__ == "StackedTerms"
    for m in SHAPES:
        ref = ref_delta(states, weights, m, [16.0] * 4)
        assert torch.allclose(stacked.delta(m).double(), ref, atol=1e-5 * float(ref.abs().max()))
    for r in (4, 24, 30):  # 30 > every client rank: the Ritz step through StackedTerms.matmul/rmatmul
        a, b = plain.project(r, lora_alpha=16), stacked.project(r, lora_alpha=16)
        for key in a:
            assert a[key].dtype == b[key].dtype == dtype
        for m in SHAPES:
            assert projection_gap(b, states, weights, m, r) <= (1e-5 if dtype == torch.float32 else 1e-2), (m, r)


def test_stacked_factored_path_is_exact(gen):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (2, 5, 3)]
    update = aggregate(states, [1.0, 2.0, 3.0], lora_alpha=16, device="cpu", stack_on_device=True)
    assert update.uses_factored_path("l0.q_proj")
    proj = update.project(4, lora_alpha=16)
    for m in SHAPES:
        assert projection_gap(proj, states, [1.0, 2.0, 3.0], m, 4) <= 1e-5


def test_staging_makes_per_client_views_only_for_methods_that_read_them(gen):
    """flexlora reads the stacks (no per-client views or LoRAFactors are made for it);
    fedavg reads each client's factors, handed over as views into the stacks (counted by EngineStats)."""
    states, weights = [make_client(dict.fromkeys(SHAPES, 8), SHAPES, gen=gen) for _ in range(3)], [1.0, 2.0, 3.0]
    flex = aggregate(states, weights, lora_alpha=16, device="cpu", stack_on_device=True)
    proj = flex.project(8, lora_alpha=16)
    for m in SHAPES:
        assert projection_gap(proj, states, weights, m, 8) <= 1e-5, m
    assert sum(flex.stats.views.values()) == 0
    plain = aggregate(states, weights, lora_alpha=16, method="fedavg")
    stacked = aggregate(states, weights, lora_alpha=16, method="fedavg", device="cpu", stack_on_device=True)
    stacked.delta(next(iter(SHAPES)))
    assert stacked.stats.views == dict.fromkeys(SHAPES, 1)
    for m in SHAPES:
        assert torch.allclose(stacked.delta(m), plain.delta(m), rtol=1e-5, atol=1e-7), m


def test_stage_keeps_client_order_and_mixed_dtypes(gen):
    A1, B1 = torch.randn(2, 5, generator=gen), torch.randn(7, 2, generator=gen)
    A2, B2 = torch.randn(3, 5, generator=gen).bfloat16(), torch.randn(7, 3, generator=gen).bfloat16()
    stacks = stage({"x": {"m": (A1, B1)}, "y": {"m": (A2, B2)}, "z": {}}, ["m"], "cpu")
    st = stacks["m"]
    assert st.clients == ("x", "y") and st.ranks == (2, 3)
    assert st.A_cat.dtype == torch.float32 and st.A_cat.shape == (5, 5) and st.B_cat.shape == (7, 5)
    assert torch.equal(st.views()["y"][0], A2.float()) and torch.equal(st.views()["y"][1], B2.float())
    assert torch.equal(st.select({"y"}).B_cat, B2.float()) and st.select({"y"}).B_cat.stride() == (4, 1)
    assert st.B_cat.stride() == (8, 1)


def test_stage_groups_clients_by_rank_and_lays_out_every_factor(gen):
    """Clients stack by rank, ascending, in their given order within a rank; A_cat and B_cat match a
    concatenation in that order, and the per-factor destinations the page-locked CUDA copy writes
    (staging._destinations, exercised here with a CPU _foreach_copy_) land where _fill packs them."""
    ranks = {"a": 8, "b": 3, "c": 8, "d": 5, "e": 3, "f": 8}
    host = {c: {"m": (torch.randn(r, 6, generator=gen), torch.randn(7, r, generator=gen))} for c, r in ranks.items()}
    st = stage(host, ["m"], "cpu")["m"]
    assert st.clients == ("b", "e", "d", "a", "c", "f") and st.ranks == (3, 3, 5, 8, 8, 8)
    assert st.B_cat.stride() == (36, 1)  # R = 35: the ΔW GEMM's leading dimension rounded up to 16 bytes
    assert torch.equal(st.A_cat, torch.cat([host[c]["m"][0] for c in st.clients]))
    assert torch.equal(st.B_cat, torch.cat([host[c]["m"][1] for c in st.clients], dim=1))
    assert all(torch.equal(st.views()[c][1], host[c]["m"][1]) for c in ranks)
    plan = staging._plan("m", host, None)
    assert plan.groups == ((2, 3), (1, 5), (3, 8))
    packed = staging._fill(plan, None)
    flat = torch.full_like(packed, math.nan)
    a_cat, b_groups = staging._views(plan, flat)
    assert len(b_groups) == 3 and b_groups[2].shape == (3, 7, 8)
    torch._foreach_copy_(staging._destinations(plan, a_cat, b_groups), [A for A, _ in plan.pairs] + [B for _, B in plan.pairs])
    assert torch.equal(flat, packed)


def test_stage_takes_strided_factors_and_an_explicit_dtype(gen):
    A1, B1 = torch.randn(5, 2, generator=gen).T, torch.randn(2, 7, generator=gen).T  # transposed views
    A2, B2 = torch.randn(3, 5, generator=gen), torch.randn(7, 3, generator=gen)
    st = stage({"x": {"m": (A1, B1)}, "y": {"m": (A2, B2)}}, ["m"], "cpu", dtype=torch.float64)["m"]
    assert st.A_cat.dtype == st.B_cat.dtype == torch.float64 and st.B_cat.stride() == (6, 1)  # 16 bytes: 2 doubles
    assert torch.equal(st.A_cat, torch.cat([A1, A2]).double()) and torch.equal(st.B_cat, torch.cat([B1, B2], dim=1).double())


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
        stacked = aggregate(
            states, weights, lora_alpha=16, on_invalid="exclude", max_norm=1e6, device="cpu", stack_on_device=True
        )
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
            assert projection_gap(proj, kept, [1.0, 1.0], m, r) <= 1e-5, (m, r)


def test_the_top_rank_factor_b_is_the_cached_spectrum_and_survives_a_restore(gen, tmp_path):
    """Projecting at the spectrum's full width hands out B = U S / s and the cache keeps that B instead
    of a second d_out x k matrix; other ranks, a saved state and its restore still give the same factors."""
    from flexlora_plugin.core import load_server_state, save_server_state

    states, weights = _states(gen), [3.0, 1.0, 2.0, 5.0]
    update = aggregate(states, weights, lora_alpha=16, max_rank=24)
    small_before = update.project(8, lora_alpha=16)
    top = update.project(24, lora_alpha=16)
    for m in SHAPES:
        spec = update.spectrum(m, 24)
        assert spec.us_scale == 16 / 24 and spec.US is top[f"{m}.lora_B.weight"]  # one tensor, not two
        assert projection_gap(top, states, weights, m, 24) <= 1e-5, m
    update._projections.clear()  # served again from the shared spectrum: a rescaled copy of B
    for key, value in update.project(8, lora_alpha=16).items():
        assert torch.allclose(value, small_before[key], rtol=1e-6, atol=0), key
    restored = load_server_state(save_server_state(tmp_path / "s.safetensors", update, round=1, max_rank=24)).update
    for r in (8, 24):
        again, live = restored.project(r, lora_alpha=16), update.project(r, lora_alpha=16)
        for key in live:
            assert torch.allclose(again[key], live[key], rtol=1e-6, atol=1e-7), (r, key)
        for m in SHAPES:
            assert projection_gap(again, states, weights, m, r) <= 1e-5, (m, r)


def test_one_value_check_path_the_host_and_the_stacked_verdicts_agree(gen):
    """The clients' own tensors and their device stack give one Verdict (flags, float64 norms) per module."""
    from flexlora_plugin.core.adapters import split_state
    from flexlora_plugin.core.staging import module_verdict
    from flexlora_plugin.core.validation import ClientUpdate, host_verdict, value_checks

    states = _states(gen)
    states[2] = {k: v.clone() for k, v in states[2].items()}
    states[2]["l0.gate_proj.lora_B.weight"][0, 0] = float("nan")
    clients = [ClientUpdate(j, 1.0, split_state(s), dict.fromkeys(SHAPES, 2.0)) for j, s in enumerate(states)]
    stacks = stage({c.client: {m: (f.A, f.B) for m, f in c.factors.items()} for c in clients}, list(SHAPES), "cpu")
    for m in SHAPES:
        host, stacked = host_verdict(m, clients), module_verdict(stacks[m])  # the stack orders clients its own way

        def by_client(v):
            return {c: (bad, a, b) for c, bad, a, b in zip(v.clients, v.nonfinite, v.a_norm, v.b_norm, strict=True)}

        here, there = by_client(host), by_client(stacked)
        assert set(here) == set(there) == set(range(len(states))), m
        for c, (bad, a, b) in here.items():
            assert bad == there[c][0] == (c == 2 and m == "l0.gate_proj"), (m, c)
            if not bad:
                assert (a, b) == (pytest.approx(there[c][1], rel=1e-6), pytest.approx(there[c][2], rel=1e-6)), (m, c)
    bad, norms = value_checks({m: host_verdict(m, clients) for m in SHAPES}, {c.client: c.scalings for c in clients})
    assert bad == {2: ["l0.gate_proj"]} and set(norms[0]) == set(SHAPES)
