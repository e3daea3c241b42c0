"""The certified filtered top-k solver (core/topk.py) and the stacked (device) path that uses it.

These run on the CPU (the same code runs on CUDA); references are independent: float64 SVDs of ΔW
built from the factors in the test (tests/conftest.py), never the core function under test.
"""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import aggregate, topk
from flexlora_plugin.core.errors import FlexLoRAWarning
from flexlora_plugin.core.projection import gram_of
from flexlora_plugin.core.topk import chunk_length, cutoff_estimate, filter_plan, filtered_spectrum
from tests.conftest import best_rank_error, make_client, projection_gap


def _delta(gen, shape, terms=40, rank=16):
    """A dense ΔW as a server sees it: many weighted low-rank client terms, heavy-tailed weights."""
    d_out, d_in = shape
    out = torch.zeros(shape, dtype=torch.float64)
    for j in range(terms):
        w = (j + 1) ** -1.5
        out += (
            w
            * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)
            @ torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
        )
    return out


def _gap(delta64, US, Vh, r):
    err = float((delta64 - US[:, :r].double() @ Vh[:r].double()).norm())
    return (err - best_rank_error(delta64, r)) / float(delta64.norm())


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])  # right (tall) and left (wide) directions
@pytest.mark.parametrize("k", [8, 40, 64])
@pytest.mark.parametrize("filter_dtype", [None, torch.float64])
def test_filtered_spectrum_is_certified_and_near_optimal(gen, monkeypatch, shape, k, filter_dtype):
    """``filter_dtype``: the filter in float64 over a float32 Gram (``topk._FILTER_DTYPE``, a GPU option);
    the factors stay in the Gram's dtype and as exact."""
    monkeypatch.setattr(topk, "_FILTER_DTYPE", filter_dtype)
    delta64 = _delta(gen, shape)
    delta = delta64.float()
    spec = filtered_spectrum(gram_of(delta), k, lambda X: delta @ X, lambda Y: delta.T @ Y)
    assert spec is not None and spec.k == k and not spec.complete
    assert spec.US.dtype == spec.Vh.dtype == torch.float32
    sv = torch.linalg.svdvals(delta64)
    assert torch.allclose(spec.S.double(), sv[:k], rtol=0, atol=1e-5 * float(sv[0]))
    for r in sorted({1, k // 2, k}):  # every prefix is served to some client
        assert _gap(delta64, spec.US, spec.Vh, r) <= 1e-6, r
    assert spec.total_energy == pytest.approx(float((sv**2).sum()), rel=1e-6)


def test_the_block_and_when_iterating_pays(gen):
    assert filter_plan(2048, 200).b == 320 and filter_plan(2048, 8).b == 64 and filter_plan(2048, 30).b == 64
    assert filter_plan(2048, 200).worthwhile and not filter_plan(500, 200).worthwhile
    delta = _delta(gen, (96, 96)).float()
    assert filtered_spectrum(gram_of(delta), 40, lambda X: delta @ X, lambda Y: delta.T @ Y) is None  # b = 96 = n


def test_without_a_certificate_the_solver_gives_up(gen):
    delta = _delta(gen, (384, 256)).float()
    calls = []

    def matmul(X):
        calls.append(1)
        return delta @ X

    assert filtered_spectrum(gram_of(delta), 40, matmul, lambda Y: delta.T @ Y, tol=0.0, rounds=2) is None
    assert len(calls) == 2  # one Rayleigh-Ritz step per round, then the caller's dense fallback


def test_a_fast_decaying_spectrum_is_certified_in_one_round(gen):
    """σ_1²/λ_b near 1e5: four Chebyshev degrees per chunk would grow the block's top direction ~1e23-fold
    over its bottom (the Cholesky–QR then breaks down and the solver fell back); one per chunk does not."""
    delta64 = _delta(gen, (384, 256), terms=200, rank=4)
    delta = delta64.float()
    calls = []

    def matmul(X):
        calls.append(1)
        return delta @ X

    spec = filtered_spectrum(gram_of(delta), 64, matmul, lambda Y: delta.T @ Y)
    assert spec is not None and len(calls) == 1
    for r in (8, 64):
        assert _gap(delta64, spec.US, spec.Vh, r) <= 1e-6, r


def test_chunk_length_follows_the_spread_of_the_spectrum():
    assert chunk_length(1.0) == 4 and chunk_length(50.0) == 4  # the 80-client benchmark's spread
    assert chunk_length(2000.0) == 2 and chunk_length(1e5) == 1 and chunk_length(1e12) == 1


def _spd(gen, eigenvalues):
    """A float64 symmetric matrix with these eigenvalues, in a random basis."""
    Q = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))[0]
    return (Q * torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("name", ["geometric", "flat", "isolated ends"])
def test_the_cutoff_estimate_brackets_the_extreme_eigenvalues(gen, name):
    """The filter's cut-off and top come from a few inverse and power iterations, not an eigendecomposition:
    Rayleigh quotients, so never outside [θ_min, θ_max], and close to the ends a float64 eigvalsh gives."""
    b = 96
    theta = {
        "geometric": [10.0 ** (-4 * i / (b - 1)) for i in range(b)],  # neighbours 1.1 apart: slow convergence
        "flat": [1.0 / (1.0 + 0.01 * i) for i in range(b)],  # clustered ends: slow vectors, close values
        "isolated ends": [50.0] + [1.0 + i / b for i in range(b - 2)] + [0.02],
    }[name]
    H = _spd(gen, theta).float()  # as the solver passes it: X^T G X in the Gram's dtype
    exact = torch.linalg.eigvalsh(H.double())
    low, top = cutoff_estimate(H, torch.Generator().manual_seed(0))
    assert float(exact[0]) * (1 - 1e-9) <= low <= 1.5 * float(exact[0]), (low, float(exact[0]))
    assert float(exact[-1]) / 1.5 <= top <= float(exact[-1]) * (1 + 1e-9), (top, float(exact[-1]))


def test_the_cutoff_estimate_of_a_singular_block_is_zero(gen):
    """A block of lower rank than b (the solver then falls back to the dense eigensolver)."""
    theta = [3.0, 2.0, 1.0] + [0.0] * 29
    for H in (_spd(gen, theta), torch.zeros(32, 32, dtype=torch.float64), torch.full((32, 32), float("nan"))):
        low, _ = cutoff_estimate(H, torch.Generator().manual_seed(0))
        assert low == 0.0


def _flat(gen, c):
    """A 384 x 256 ΔW with σ_i² = 1/(1 + c i): a slowly decaying spectrum, slow for any subspace iteration."""
    U = torch.linalg.qr(torch.randn(384, 256, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(256, 256, generator=gen, dtype=torch.float64))[0]
    return (U * (1.0 / (1.0 + c * torch.arange(256, dtype=torch.float64))).sqrt()) @ V.T


def test_the_certified_tolerance_follows_the_dtype():
    delta64 = _flat(torch.Generator().manual_seed(7), 0.002)
    rounds = {}
    for dtype in (torch.float32, torch.float64):
        delta, calls = delta64.to(dtype), []

        def matmul(X, delta=delta, calls=calls):
            calls.append(1)
            return delta @ X

        spec = filtered_spectrum(gram_of(delta), 40, matmul, lambda Y, delta=delta: delta.T @ Y)
        assert spec is not None
        rounds[dtype] = len(calls)
        assert _gap(delta64, spec.US, spec.Vh, 40) <= (1e-7 if dtype == torch.float32 else 1e-13), dtype
    assert rounds == {torch.float32: 1, torch.float64: 2}  # float64 is certified to 1e-12, float32 to 1e-7


def test_the_seed_fixes_the_factors(gen):
    delta = _delta(gen, (384, 256)).float()
    a, b, c = (filtered_spectrum(gram_of(delta), 40, lambda X: delta @ X, lambda Y: delta.T @ Y, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.Vh, b.Vh) and torch.equal(a.US, b.US)
    assert not torch.equal(a.Vh, c.Vh)  # another start, the same subspace to the tolerance
    assert torch.allclose((a.US @ a.Vh), (c.US @ c.Vh), atol=1e-4 * float(a.S[0]))


# --------------------------------------------------------------------------- through aggregate()

# stacked rank 8 x 40 = 320 > min(d): the dense path; b = 64 for k = 24, n >= 192: the filtered solver
BIG = {"l0.q_proj": (192, 192), "l0.gate_proj": (320, 192), "l0.down_proj": (192, 320)}


def _big_states(gen, n=8, rank=40):
    """Clients whose updates shrink like (j+1)^-0.75: a spectrum with a head, as trained adapters give."""
    return [{k: v * (j + 1) ** -0.75 for k, v in make_client(dict.fromkeys(BIG, rank), BIG, gen=gen).items()} for j in range(n)]


class _Count:
    """What ``update.stats`` (EngineStats, public) counted: the filtered solves ``(k, certified)`` and the ΔW formed."""

    def __init__(self, update):
        self.solved = [(k, ok) for _, k, ok in update.stats.solves]
        self.deltas = sum(update.stats.deltas.values())


@pytest.mark.parametrize("max_rank", [None, 24])
def test_stacked_spectra_are_computed_while_staging_and_exact(gen, monkeypatch, max_rank):
    states = _big_states(gen)
    weights = [float(j + 1) for j in range(len(states))]
    update = aggregate(states, weights, lora_alpha=16, max_rank=max_rank, device="cpu", stack_on_device=True)
    count = _Count(update)
    assert count.solved == [(max_rank or 40, True)] * len(BIG)  # one certified solve per module, before any project()
    assert count.deltas == len(BIG) and set(update.stats.staged) == set(BIG)
    for r in (4, 24) if max_rank else (4, 24, 40):
        proj = update.project(r, lora_alpha=16)
        for m in BIG:
            assert projection_gap(proj, states, weights, m, r) <= 1e-6, (m, r)
    count = _Count(update)
    assert len(count.solved) == len(BIG) and count.deltas == len(BIG)  # project() added none


def test_a_rank_above_the_first_solve_reuses_the_kept_gram(gen, monkeypatch):
    states = _big_states(gen)
    weights = [1.0] * len(states)
    update = aggregate(states, weights, lora_alpha=16, device="cpu", stack_on_device=True)  # default call: k = 40
    proj = update.project(56, lora_alpha=16)  # above every client rank
    count = _Count(update)
    assert count.deltas == len(BIG)  # no second ΔW: a solve on the kept Gram, products with the factors
    assert [k for k, _ in count.solved] == [40] * len(BIG) + [56] * len(BIG)
    for m in BIG:
        assert projection_gap(proj, states, weights, m, 56) <= 1e-6, m


def test_an_exclusion_discards_what_was_computed_while_staging(gen, monkeypatch):
    states = _big_states(gen)
    weights = [1.0] * len(states)
    states[3] = {k: v * 1e4 for k, v in states[3].items()}  # above max_norm: excluded after staging
    with pytest.warns(FlexLoRAWarning):
        update = aggregate(
            states, weights, lora_alpha=16, max_rank=24, max_norm=1e6, on_invalid="exclude", device="cpu", stack_on_device=True
        )
    assert set(update.excluded) == {3} and len(update.stats.solves) == len(BIG)  # while staging, with client 3
    kept = [s for j, s in enumerate(states) if j != 3]
    proj = update.project(24, lora_alpha=16)
    for m in BIG:
        assert projection_gap(proj, kept, [1.0] * len(kept), m, 24) <= 1e-6, m
    count = _Count(update)
    assert len(count.solved) == 2 * len(BIG)


def test_a_rank_deficient_delta_falls_back_and_stays_exact(gen):
    one = _big_states(gen, n=1)[0]
    states = [one] * 8  # stacked rank 320, rank(ΔW) = 40 < b: no certificate, the dense eigensolver
    update = aggregate(states, [1.0] * 8, lora_alpha=16, max_rank=24, device="cpu", stack_on_device=True)
    proj = update.project(24, lora_alpha=16)
    for m in BIG:
        assert projection_gap(proj, states, [1.0] * 8, m, 24) <= 1e-6, m


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", ["none", "all", "middle"])
def test_cuda_stacked_path_is_exact_from_pageable_and_pinned_factors(gen, monkeypatch, pinned):
    """``middle``: only gate_proj, between two pageable modules, is page-locked: the producer thread
    queues its copy between filling the others' buffers (staging._pipelined)."""
    states = _big_states(gen)
    weights = [float(j + 1) for j in range(len(states))]
    if pinned != "none":
        states = [{k: v.pin_memory() if pinned == "all" or "gate_proj" in k else v for k, v in s.items()} for s in states]
    update = aggregate(states, weights, lora_alpha=16, max_rank=24, device="cuda")
    count = _Count(update)
    assert sorted(count.solved) == [(24, True)] * len(BIG)  # in the worker threads, while staging
    for r in (4, 24):
        proj = update.project(r, lora_alpha=16)
        assert all(t.device.type == "cpu" for t in proj.values())
        for m in BIG:
            assert projection_gap(proj, states, weights, m, r) <= 1e-6, (m, r)


def test_float64_compute_stays_float64_exact_through_aggregate(gen, monkeypatch):
    states = _big_states(gen)
    weights = [float(j + 1) for j in range(len(states))]
    update = aggregate(
        states, weights, lora_alpha=16, max_rank=24, compute_dtype=torch.float64, device="cpu", stack_on_device=True
    )
    count = _Count(update)
    assert count.solved == [(24, True)] * len(BIG)
    proj = update.project(24, lora_alpha=16, dtype=torch.float64)
    for m in BIG:
        assert projection_gap(proj, states, weights, m, 24) <= 1e-11, m
