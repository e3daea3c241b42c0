"""FlexLoRA aggregation and projection against independent float64 references."""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import aggregate, lora_scaling
from flexlora_plugin.core.projection import dense_spectrum, factored_spectrum
from tests.conftest import best_rank_error, make_client, ref_delta

SHAPES = {"layers.0.q_proj": (40, 24), "layers.0.down_proj": (24, 56), "layers.1.q_proj": (40, 24)}


def _clients(gen, ranks_per_client, dtype=torch.float32, adapter=None):
    return [
        make_client(dict.fromkeys(SHAPES, r) if isinstance(r, int) else r, SHAPES, gen=gen, dtype=dtype, adapter=adapter)
        for r in ranks_per_client
    ]


def _product(proj, module, r, alpha=16.0, adapter=None, rslora=False):
    mid = f".{adapter}" if adapter else ""
    A = proj[f"{module}.lora_A{mid}.weight"].double()
    B = proj[f"{module}.lora_B{mid}.weight"].double()
    assert A.shape[0] == r and B.shape[1] == r
    return lora_scaling(alpha, r, rslora) * B @ A


@pytest.mark.parametrize("adapter", [None, "default"])
def test_delta_equals_weighted_sum(gen, adapter):
    states = _clients(gen, [2, 4, 8], adapter=adapter)
    weights = [10.0, 30.0, 60.0]
    update = aggregate(states, weights, lora_alpha=16)
    for module in SHAPES:
        ref = ref_delta(states, weights, module, [16] * 3, adapter=adapter)
        got = update.delta(module)
        assert got.dtype == torch.float32 and got.shape == SHAPES[module]
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max())


def test_partial_modules_renormalise_weights(gen):
    states = _clients(gen, [2, 4, 8])
    states[1] = {k: v for k, v in states[1].items() if "layers.1" not in k}
    update = aggregate(states, [1.0, 2.0, 3.0], lora_alpha=8)
    ref = ref_delta(states, [1.0, 2.0, 3.0], "layers.1.q_proj", [8] * 3)  # holders 0 and 2: weights 1/4, 3/4
    assert torch.allclose(update.delta("layers.1.q_proj").double(), ref, atol=1e-5)


@pytest.mark.parametrize("ranks_per_client", [[2, 4, 8], [8, 16, 24, 20]])  # factored path / dense path
@pytest.mark.parametrize("rslora", [False, True])
def test_projection_is_eckart_young_optimal(gen, ranks_per_client, rslora):
    states = _clients(gen, ranks_per_client)
    update = aggregate(states, [1.0] * len(states), lora_alpha=16, use_rslora=rslora)
    for module in SHAPES:
        ref = ref_delta(states, [1.0] * len(states), module, [16] * len(states), rslora=rslora)
        for r in (1, 3, 8, 20):
            proj = update.project(r, lora_alpha=16, use_rslora=rslora)
            err = float((ref - _product(proj, module, r, rslora=rslora)).norm())
            assert (err - best_rank_error(ref, r)) / float(ref.norm()) <= 1e-5, (module, r)


def test_factored_and_dense_paths_agree(gen):
    Bs = [torch.randn(300, r, generator=gen) for r in (3, 5, 9)]
    As = [torch.randn(r, 200, generator=gen) for r in (3, 5, 9)]
    coefs = [0.5, 1.5, -0.25]
    fact = factored_spectrum(Bs, As, coefs)
    dense = sum(c * B.double() @ A.double() for c, B, A in zip(coefs, Bs, As))
    for k in (4, 10, 17):
        d = dense_spectrum(dense.float(), k)
        assert torch.allclose(d.S, fact.S[:k], rtol=1e-4)
        prod_f = fact.US[:, :k].double() @ fact.Vh[:k].double()
        prod_d = d.US.double() @ d.Vh.double()
        assert float((prod_f - prod_d).norm() / dense.norm()) < 1e-5
    assert fact.k == 17 and fact.complete


def test_dense_spectrum_gram_path_is_accurate(gen):
    # wide and tall matrices, k small enough for the Gram + Rayleigh–Ritz path
    for shape in ((120, 400), (400, 120)):
        M = torch.randn(*shape, generator=gen, dtype=torch.float64)
        for k in (5, 30):
            spec = dense_spectrum(M.float(), k)
            approx = spec.US.double() @ spec.Vh.double()
            assert (float((M - approx).norm()) - best_rank_error(M, k)) / float(M.norm()) <= 1e-5
            assert torch.allclose(spec.S.double(), torch.linalg.svdvals(M)[:k], rtol=1e-4)
            assert abs(spec.total_energy - float((M**2).sum())) <= 1e-5 * float((M**2).sum())


def test_update_uses_dense_path_when_stacked_rank_is_large(gen):
    small = aggregate(_clients(gen, [2, 4]), [1, 1], lora_alpha=16)
    large = aggregate(_clients(gen, [16, 16]), [1, 1], lora_alpha=16)
    assert small.uses_factored_path("layers.0.q_proj")
    assert not large.uses_factored_path("layers.0.q_proj")


def test_energy_kept_matches_residual(gen):
    states = _clients(gen, [4, 8])
    update = aggregate(states, [1, 3], lora_alpha=16)
    for r in (1, 4, 12):
        kept = update.energy_kept(r)
        proj = update.project(r, lora_alpha=16)
        for module in SHAPES:
            ref = ref_delta(states, [1, 3], module, [16, 16])
            resid = float((ref - _product(proj, module, r)).norm() ** 2 / ref.norm() ** 2)
            assert kept[module] == pytest.approx(1 - resid, abs=1e-5)


def test_per_module_rank_map_and_receiver_scaling(gen):
    states = _clients(gen, [4, 8])
    update = aggregate(states, [1, 1], lora_alpha=16)
    proj = update.project({"q_proj": 3, "down_proj": 5}, scaling=0.5)
    assert proj["layers.0.q_proj.lora_A.weight"].shape == (3, 24)
    assert proj["layers.0.down_proj.lora_B.weight"].shape == (24, 5)
    ref = ref_delta(states, [1, 1], "layers.0.down_proj", [16, 16])
    prod = 0.5 * proj["layers.0.down_proj.lora_B.weight"].double() @ proj["layers.0.down_proj.lora_A.weight"].double()
    assert (float((ref - prod).norm()) - best_rank_error(ref, 5)) / float(ref.norm()) <= 1e-5


def test_explicit_scalings_override_alpha(gen):
    states = _clients(gen, [4, 8])
    update = aggregate(states, [1, 1], scalings=[2.0, {"q_proj": 0.5, "down_proj": 0.25}])
    ref = ref_delta(states, [1, 1], "layers.0.down_proj", [2.0 * 4, 0.25 * 8])  # alpha = s·r
    assert torch.allclose(update.delta("layers.0.down_proj").double(), ref, atol=1e-5)


def test_bf16_inputs_compute_in_fp32_and_return_bf16(gen):
    states = _clients(gen, [4, 8], dtype=torch.bfloat16)
    update = aggregate(states, [1, 1], lora_alpha=16)
    ref = ref_delta(states, [1, 1], "layers.0.q_proj", [16, 16])  # exact product of the bf16 values
    assert update.delta("layers.0.q_proj").dtype == torch.float32
    assert torch.allclose(update.delta("layers.0.q_proj").double(), ref, atol=1e-4)
    proj = update.project(6, lora_alpha=16)
    assert all(t.dtype == torch.bfloat16 for t in proj.values())
    err = float((ref - _product(proj, "layers.0.q_proj", 6)).norm())
    assert (err - best_rank_error(ref, 6)) / float(ref.norm()) <= 1e-2  # bf16 output rounding


def test_float64_compute_is_tighter(gen):
    states = _clients(gen, [8, 16, 24], dtype=torch.float64)
    update = aggregate(states, [1, 1, 1], lora_alpha=16, compute_dtype=torch.float64)
    ref = ref_delta(states, [1, 1, 1], "layers.0.q_proj", [16] * 3)
    assert float((update.delta("layers.0.q_proj") - ref).norm() / ref.norm()) < 1e-13


def test_same_rank_projection_is_computed_once(gen):
    update = aggregate(_clients(gen, [4, 8]), [1, 1], lora_alpha=16)
    a = update.project(4, lora_alpha=16)
    b = update.project(4, lora_alpha=16)
    assert all(a[k] is b[k] for k in a)


def test_methods_differ(gen):
    states = _clients(gen, [8, 8])
    flex = aggregate(states, [1, 2], lora_alpha=16)
    avg = aggregate(states, [1, 2], lora_alpha=16, method="fedavg")
    het = aggregate(states, [1, 2], lora_alpha=16, method="hetlora")
    m = "layers.0.q_proj"
    assert float((flex.delta(m) - avg.delta(m)).norm()) > 1e-3 * float(flex.delta(m).norm())
    assert float((flex.delta(m) - het.delta(m)).norm()) > 1e-3 * float(flex.delta(m).norm())


@pytest.mark.slow
def test_energy_kept_is_accurate_on_a_large_dense_path_module():
    """A float32 norm of a 2048 x 5504 ΔW is off by ~1e-3; the energy ratio must hold to 1e-5."""
    g = torch.Generator().manual_seed(7)
    shapes = {"mlp.down_proj": (2048, 5504)}
    states = [make_client({"mlp.down_proj": 256}, shapes, gen=g) for _ in range(10)]  # R = 2560 > 2048: dense path
    update = aggregate(states, [1.0] * 10, lora_alpha=16, max_rank=64)
    assert not update.uses_factored_path("mlp.down_proj")
    ref = ref_delta(states, [1.0] * 10, "mlp.down_proj", [16] * 10)
    S = torch.linalg.svdvals(ref)
    for r in (8, 64):
        exact = float((S[:r] ** 2).sum() / (S**2).sum())
        assert update.energy_kept(r)["mlp.down_proj"] == pytest.approx(exact, abs=1e-5)
