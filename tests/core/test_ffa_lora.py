"""FFA-LoRA: A frozen at the common start, only B trains and travels; checked against float64 references
written here from the equation ``B_g = Σ_k p_k s_k pad(B_k)``, ``ΔW = B_g A[:R]``."""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import (
    ClientModel,
    FlexLoRAConfig,
    FlexLoRAWarning,
    MissingModuleError,
    UnsupportedKeyError,
    aggregate,
    common_lora_A,
    load_server_state,
    module_infos,
    save_server_state,
)
from flexlora_plugin.core.federation import Federation, Reply

SHAPES = {"base_model.model.l0.q_proj": (24, 16), "base_model.model.l0.down_proj": (16, 40)}
RANKS = [2, 4, 8]
WEIGHTS = [3.0, 1.0, 6.0]
ALPHA = 16.0
SEED = 7


def _b_only(r, gen, dtype=torch.float32):
    return {
        f"{m}.lora_B.weight": torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(dtype)
        for m, (d_out, _) in SHAPES.items()
    }


def _reference(states, weights, module):
    """B_g (d_out, R) and ΔW = Σ_k p_k (alpha / r_k) B_k A[:r_k], A the common start, in float64."""
    d_out, d_in = SHAPES[module]
    total = sum(weights)
    delta = torch.zeros(d_out, d_in, dtype=torch.float64)
    B_g = torch.zeros(d_out, max(RANKS), dtype=torch.float64)
    for state, w in zip(states, weights):
        wire = state[f"{module}.lora_B.weight"].dtype
        B = state[f"{module}.lora_B.weight"].double()
        r = B.shape[1]
        A = common_lora_A(module, r, d_in, seed=SEED).to(wire).double()  # rounded once to the wire dtype
        delta += (w / total) * (ALPHA / r) * B @ A
        B_g[:, :r] += (w / total) * (ALPHA / r) * B
    return B_g, delta


@pytest.mark.parametrize("stacked", [False, True])
def test_the_global_update_is_the_exact_sum_on_the_frozen_A(gen, stacked):
    states = [_b_only(r, gen) for r in RANKS]
    update = aggregate(
        states,
        WEIGHTS,
        method="ffa-lora",
        lora_alpha=ALPHA,
        expected_shapes=SHAPES,
        seed=SEED,
        device="cpu",
        stack_on_device=stacked,
    )
    for m, (_, d_in) in SHAPES.items():
        B_g, ref = _reference(states, WEIGHTS, m)
        assert float((update.delta(m).double() - ref).norm() / ref.norm()) <= 1e-6, m
        for r in (2, 5, 8):
            proj = update.project(r, lora_alpha=ALPHA)
            A, B = proj[f"{m}.lora_A.weight"], proj[f"{m}.lora_B.weight"]
            assert torch.equal(A, common_lora_A(m, r, d_in, seed=SEED)), (m, r)  # the client's own frozen A
            assert torch.allclose(B.double(), B_g[:, :r] / (ALPHA / r), rtol=1e-5, atol=1e-6), (m, r)


def test_float64_compute_and_a_bfloat16_wire_are_exact(gen):
    states = [_b_only(r, gen, torch.bfloat16) for r in RANKS]
    update = aggregate(
        states, WEIGHTS, method="ffa-lora", lora_alpha=ALPHA, expected_shapes=SHAPES, seed=SEED, compute_dtype=torch.float64
    )
    for m in SHAPES:
        _, ref = _reference(states, WEIGHTS, m)  # the A rounded to bfloat16 once, as every client holds it
        assert float((update.delta(m) - ref).norm() / ref.norm()) <= 1e-12, m


def test_a_reply_with_an_A_factor_is_refused(gen):
    states = [_b_only(r, gen) for r in RANKS]
    states[1][f"{next(iter(SHAPES))}.lora_A.weight"] = torch.zeros(4, 16)
    with pytest.raises(UnsupportedKeyError, match="lora_B only"):
        aggregate(states, WEIGHTS, method="ffa-lora", lora_alpha=ALPHA, expected_shapes=SHAPES, seed=SEED)
    with pytest.warns(FlexLoRAWarning):
        update = aggregate(
            states, WEIGHTS, method="ffa-lora", lora_alpha=ALPHA, expected_shapes=SHAPES, seed=SEED, on_invalid="exclude"
        )
    assert set(update.excluded) == {1} and "lora_B only" in update.excluded[1]
    with pytest.raises(ValueError, match="needs expected_shapes"):
        aggregate(states, WEIGHTS, method="ffa-lora", lora_alpha=ALPHA, seed=SEED)


def test_state_round_trip_and_export(gen, tmp_path):
    from flexlora_plugin.core.export import export_adapter

    states = [_b_only(r, gen) for r in RANKS]
    update = aggregate(states, WEIGHTS, method="ffa-lora", lora_alpha=ALPHA, expected_shapes=SHAPES, seed=SEED)
    restored = load_server_state(save_server_state(tmp_path / "s.safetensors", update, round=1, seed=SEED)).update
    assert restored.method == "ffa-lora"
    for key, value in update.project(4, lora_alpha=ALPHA).items():
        assert torch.equal(restored.project(4, lora_alpha=ALPHA)[key], value), key
    tensors, ranks = export_adapter(update, lora_alpha=ALPHA)
    for m in SHAPES:
        _, ref = _reference(states, WEIGHTS, m)
        A, B = tensors[f"{m}.lora_A.weight"].double(), tensors[f"{m}.lora_B.weight"].double()
        assert float(((ALPHA / ranks[m]) * B @ A - ref).norm() / ref.norm()) <= 1e-6, m


def test_the_federation_sends_B_only_and_takes_B_only_replies(gen):
    shapes = {m.removeprefix("base_model.model."): s for m, s in SHAPES.items()}
    cfg = FlexLoRAConfig(method="ffa-lora", lora_alpha=ALPHA, seed=SEED, rank_table={"0": 2, "1": 4, "2": 8})
    fed = Federation(cfg, module_infos(shapes), shapes=shapes)
    for c in range(3):
        fed.draw_ranks(c)
    assert fed.trains == ("lora_B",)
    sent = fed.factors_for(2)
    assert all(".lora_B." in k for k in sent) and len(sent) == len(SHAPES)
    assert not any(t.any() for t in sent.values())  # round 1: B = 0 on the common A
    replies = {c: Reply(_b_only(r, gen), w) for c, (r, w) in enumerate(zip(RANKS, WEIGHTS))}
    result = fed.aggregate(replies)
    assert result.updated and result.excluded == {}
    for c, r in enumerate(RANKS):
        sent = fed.factors_for(c)
        assert set(sent) == {f"{m}.lora_B.weight" for m in SHAPES}
        for m in SHAPES:
            B_g, _ = _reference([replies[k].state for k in range(3)], WEIGHTS, m)
            assert torch.allclose(sent[f"{m}.lora_B.weight"].double(), B_g[:, :r] / (ALPHA / r), rtol=1e-5, atol=1e-6)
    bad = {0: Reply({**replies[0].state, f"{next(iter(SHAPES))}.lora_A.weight": torch.zeros(2, 16)}, 3.0)}
    assert "lora_B only" in fed.aggregate(bad).excluded[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flexlora_plugin.tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_length=128)


def test_the_client_trains_and_sends_B_only_on_the_regenerated_A(tiny):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny))
    cm = ClientModel(base, lora_alpha=ALPHA, target_modules=("q_proj", "down_proj"), method="ffa-lora", seed=SEED)
    ranks = {m: 4 for m in cm.shapes}
    received = {f"base_model.model.{m}.lora_B.weight": torch.zeros(d_out, 4) for m, (d_out, _) in cm.shapes.items()}
    model = cm.activate(ranks, received)
    trainable = dict(cm.trainable())
    assert trainable and all(".lora_B." in n for n in trainable)
    state = cm.state()
    assert set(state) == set(received)  # only B travels back
    for name, param in model.named_parameters():
        if ".lora_A." in name and ".flex0." in name:
            module = name.split(".lora_A.")[0]
            assert torch.equal(param.detach(), common_lora_A(module, 4, param.shape[1], seed=SEED)), name
    with pytest.raises(UnsupportedKeyError, match="factors this method sends"):
        cm.activate(ranks, {**received, next(iter(received)).replace("lora_B", "lora_A"): torch.zeros(4, 8)})
    with pytest.raises(MissingModuleError):
        cm.activate(ranks, dict(list(received.items())[1:]))
