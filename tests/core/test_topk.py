"""The certified filtered top-k solver (core/topk.py).

These run on the CPU (the same code runs on CUDA); references are independent: float64 SVDs of ΔW
built from the factors in the test (tests/conftest.py), never the core function under test.
"""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core.projection import gram_of
from flexlora_plugin.core.topk import filter_plan, filtered_spectrum
from tests.conftest import best_rank_error


def _delta(gen, shape, terms=40, rank=16):
    """A dense ΔW as a server sees it: many weighted low-rank client terms, heavy-tailed weights."""
    d_out, d_in = shape
    out = torch.zeros(shape, dtype=torch.float64)
    for j in range(terms):
        w = (j + 1) ** -1.5
        out += w * torch.randn(d_out, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, d_in, generator=gen, dtype=torch.float64)
    return out


def _gap(delta64, US, Vh, r):
    err = float((delta64 - US[:, :r].double() @ Vh[:r].double()).norm())
    return (err - best_rank_error(delta64, r)) / float(delta64.norm())


@pytest.mark.parametrize("shape", [(384, 256), (256, 384)])  # right (tall) and left (wide) directions
@pytest.mark.parametrize("k", [8, 40, 64])
def test_filtered_spectrum_is_certified_and_near_optimal(gen, shape, k):
    delta64 = _delta(gen, shape)
    delta = delta64.float()
    spec = filtered_spectrum(gram_of(delta), k, lambda X: delta @ X, lambda Y: delta.T @ Y)
    assert spec is not None and spec.k == k and not spec.complete
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


def test_the_seed_fixes_the_factors(gen):
    delta = _delta(gen, (384, 256)).float()
    a, b, c = (filtered_spectrum(gram_of(delta), 40, lambda X: delta @ X, lambda Y: delta.T @ Y, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.Vh, b.Vh) and torch.equal(a.US, b.US)
    assert not torch.equal(a.Vh, c.Vh)  # another start, the same subspace to the tolerance
    assert torch.allclose((a.US @ a.Vh), (c.US @ c.Vh), atol=1e-4 * float(a.S[0]))
