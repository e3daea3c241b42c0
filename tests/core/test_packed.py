"""The packed Gram matrix (half the memory) and its LAPACK ``?spevx`` eigensolver.

References are independent: the Gram matrix of a float64 ΔW built here with matmuls, its packed
layout read off with ``torch.tril_indices`` (row-major lower = column-major upper, LAPACK's
``UPLO = 'U'`` packed order), and ``torch.linalg.eigh``.
"""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import aggregate
from flexlora_plugin.core import packed as packed_mod
from flexlora_plugin.core import projection as projection_mod
from flexlora_plugin.core.packed import PackedEigenError, PanelGram, packed_size, packed_top_eigvecs, panel_bounds
from flexlora_plugin.core.terms import TermList
from tests.conftest import make_client, projection_gap


def _packed_reference(G: torch.Tensor) -> torch.Tensor:
    """``G``'s upper triangle, column after column: ``G[j, i]`` for ``i ≤ j``, ``j`` ascending."""
    rows, cols = torch.tril_indices(G.shape[0], G.shape[0])
    return G[rows, cols]


@pytest.mark.parametrize("n, width", [(64, 24), (64, 64), (50, 7), (1, 4)])
def test_panels_pack_into_lapack_layout(gen, n, width):
    slabs = [torch.randn(n, b, generator=gen, dtype=torch.float64) for b in (5, 11, 3)]
    G = sum(s @ s.T for s in slabs)
    panels = PanelGram(n, torch.float64, width=width)
    for s in slabs:
        panels.add(s)
    assert panels.trace() == pytest.approx(float(G.trace()), rel=1e-12)
    ap = panels.pack()
    assert ap.shape == (packed_size(n),)
    assert torch.allclose(ap, _packed_reference(G), rtol=1e-12, atol=1e-12)
    assert panels.pack() is not ap and torch.equal(panels.pack(), ap)  # packing twice changes nothing
    with pytest.raises(RuntimeError, match="after pack"):
        panels.add(slabs[0])


def test_panel_buffer_is_about_half_the_matrix():
    n, width = 2048, 256
    j0, j1, offset = panel_bounds(n, width)[-1]
    buffer = offset + (j1 - j0) * j1
    assert buffer == n * n // 2 + n * width // 2
    assert all(off >= packed_size(a) for a, _, off in panel_bounds(n, width))  # packing only moves data down
    with pytest.raises(ValueError):
        panel_bounds(0)
    with pytest.raises(TypeError, match="float32 or float64"):
        PanelGram(8, torch.bfloat16)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_packed_eigenvectors_match_the_full_decomposition(gen, dtype, tol, k):
    n = 40
    X = torch.randn(n, 90, generator=gen, dtype=torch.float64)
    G = X @ X.T
    _, vecs = torch.linalg.eigh(G)
    lead = vecs.flip(1)[:, :k]
    ap = _packed_reference(G).to(dtype)
    got = packed_top_eigvecs(ap, n, k)
    assert got.shape == (n, k) and got.dtype == dtype
    align = (got.double().T @ lead).abs().diagonal()  # the same leading-first directions, up to sign
    assert torch.allclose(align, torch.ones(k, dtype=torch.float64), atol=tol)
    assert torch.allclose(got.double().T @ got.double(), torch.eye(k, dtype=torch.float64), atol=tol)


def test_packed_eigensolver_rejects_bad_input():
    with pytest.raises(ValueError, match="want 10"):
        packed_top_eigvecs(torch.zeros(9), 4, 2)
    with pytest.raises(ValueError, match="k=5"):
        packed_top_eigvecs(torch.zeros(10), 4, 5)
    with pytest.raises(TypeError, match="float32/float64"):
        packed_top_eigvecs(torch.zeros(10, dtype=torch.bfloat16), 4, 2)


@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 96)])
def test_gram_from_slabs_is_packed_on_the_cpu(gen, shape):
    d_out, d_in = shape
    items = [
        (c, torch.randn(d_out, r, generator=gen), torch.randn(r, d_in, generator=gen))
        for c, r in ((0.5, 20), (-1.5, 30), (2.0, 25))
    ]
    gram = TermList(items, shape).gram(torch.float32, None, block_bytes=4 * 64 * 7)
    dense = sum(c * B.double() @ A.double() for c, B, A in items)
    ref = dense @ dense.T if d_out <= d_in else dense.T @ dense
    assert gram.packed and gram.matrix.shape == (packed_size(64),)
    assert torch.allclose(gram.matrix.double(), _packed_reference(ref), atol=1e-5 * float(ref.abs().max()))
    assert gram.total_energy == pytest.approx(float(dense.square().sum()), rel=1e-6)


SHAPES = {"l0.q_proj": (64, 64), "l0.gate_proj": (96, 64)}


def test_rank_deficient_update_is_exact_on_the_packed_path(gen):
    """ΔW of rank 10 < k = 24, from a stacked rank of 80 > 64 (so the Gram path): the top-k
    range holds a cluster of (numerically) zero eigenvalues."""
    basis = {
        m: (torch.randn(d_out, 10, generator=gen), torch.randn(10, d_in, generator=gen)) for m, (d_out, d_in) in SHAPES.items()
    }
    states = []
    for _ in range(4):
        state = make_client(dict.fromkeys(SHAPES, 20), SHAPES, gen=gen)
        for m, (U, V) in basis.items():  # B = U M, A = N V: every client inside the same rank-10 space
            state[f"{m}.lora_B.weight"] = U @ torch.randn(10, 20, generator=gen) / 10
            state[f"{m}.lora_A.weight"] = torch.randn(20, 10, generator=gen) @ V / 10
        states.append(state)
    weights = [1.0, 2.0, 3.0, 4.0]
    update = aggregate(states, weights, lora_alpha=16, max_rank=24)
    for r in (8, 24):
        proj = update.project(r, lora_alpha=16)
        for m in SHAPES:
            assert update.spectrum(m, 24).numerical_rank() == 10
            assert projection_gap(proj, states, weights, m, r) <= 1e-5, (m, r)


def test_a_failed_packed_solve_retries_with_the_whole_gram(gen, monkeypatch, caplog):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (24, 24, 12, 8)]
    weights = [3.0, 1.0, 2.0, 5.0]
    calls = []

    def failing(ap, n, k):  # LAPACK's info > 0, injected: ?spevx has destroyed the matrix by then
        calls.append(n)
        ap.zero_()
        raise PackedEigenError("LAPACK ?spevx: info=3, 21 of 24 eigenvectors (n=64)")

    monkeypatch.setattr(projection_mod, "packed_top_eigvecs", failing)
    update = aggregate(states, weights, lora_alpha=16, max_rank=24)
    with caplog.at_level("WARNING", logger="flexlora_plugin.core.aggregation"):
        proj = update.project(24, lora_alpha=16)
    assert calls == [64, 64]
    assert sum("retrying with the whole Gram matrix" in rec.getMessage() for rec in caplog.records) == 2
    for m in SHAPES:
        assert projection_gap(proj, states, weights, m, 24) <= 1e-5, m


def test_the_eigensolver_leaves_the_blas_thread_count_as_it_found_it(gen):
    setter = packed_mod._blas_threads_setter("dspevx")
    if setter is None:
        pytest.skip("scipy's LAPACK is not an OpenBLAS with openblas_set_num_threads_local")
    before = setter(3)  # read the current count (and put it back)
    setter(before)
    X = torch.randn(30, 40, generator=gen, dtype=torch.float64)
    packed_top_eigvecs(_packed_reference(X @ X.T), 30, 4)  # runs on one thread
    assert setter(before) == before


def test_float64_compute_uses_the_float64_packed_solver(gen, monkeypatch):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen, dtype=torch.float64) for r in (24, 24, 12, 8)]
    weights = [3.0, 1.0, 2.0, 5.0]
    solved = []
    real = projection_mod.packed_top_eigvecs

    def spy(ap, n, k):
        solved.append(ap.dtype)
        return real(ap, n, k)

    monkeypatch.setattr(projection_mod, "packed_top_eigvecs", spy)
    update = aggregate(states, weights, lora_alpha=16, max_rank=24, compute_dtype=torch.float64)
    proj = update.project(24, lora_alpha=16, dtype=torch.float64)
    assert solved == [torch.float64] * len(SHAPES)
    for m in SHAPES:
        assert projection_gap(proj, states, weights, m, 24) <= 1e-11, m
