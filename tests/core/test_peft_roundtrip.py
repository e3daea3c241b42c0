"""Key formats through real peft models (tiny random LLaMA), and the rank > rank(ΔW) case."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from flexlora_plugin.core import aggregate, clamp_ranks, lora_scaling, sample_ranks
from flexlora_plugin.core.peft_io import adapter_state, load_adapter_state, lora_config_for, target_shapes
from flexlora_plugin.tools.tiny import build_tiny_llama
from tests.conftest import best_rank_error

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPHA = 16.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def _peft(tiny, ranks, seed):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(tiny)
    shapes = target_shapes(base, TARGETS)
    return get_peft_model(base, lora_config_for(clamp_ranks(ranks, shapes), lora_alpha=ALPHA)), shapes


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _modules(state):
    return sorted({k.split(".lora_")[0] for k in state})


@pytest.mark.parametrize("fmt", ["peft", "fs"])
def test_round_trip_through_peft_models(tiny, fmt):
    ranks_list = [
        {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 8, "up_proj": 8, "down_proj": 8},
        {t: 16 for t in TARGETS},
        {t: 2 for t in TARGETS},
    ]
    states = []
    for i, ranks in enumerate(ranks_list):
        model, shapes = _peft(tiny, ranks, seed=i)
        _randomise(model, seed=10 + i)
        if fmt == "peft":
            states.append(adapter_state(model))
        else:  # FS-LLM sends model.state_dict() entries of trainable params: ...lora_A.default.weight
            states.append({k: v.detach() for k, v in model.state_dict().items() if "lora_" in k})
    assert all(("default" in k) == (fmt == "fs") for k in states[0])
    update = aggregate(states, [1.0, 2.0, 1.0], lora_alpha=ALPHA)
    receiver, shapes = _peft(tiny, {t: 8 for t in TARGETS}, seed=99)
    proj = update.project(8, lora_alpha=ALPHA)
    assert set(proj) == set(states[0])  # same key format as the input
    if fmt == "peft":
        load_adapter_state(receiver, proj)
    else:
        result = receiver.load_state_dict(proj, strict=False)
        assert not result.unexpected_keys
    held = adapter_state(receiver)
    for module in _modules(held):
        A, B = held[f"{module}.lora_A.weight"].double(), held[f"{module}.lora_B.weight"].double()
        assert A.shape[0] == min(8, *B.shape[:1], A.shape[1])
        key = module if fmt == "peft" else module  # module names are the same prefix in both formats
        mid = "" if fmt == "peft" else ".default"
        ref = sum(
            w
            / 4
            * lora_scaling(ALPHA, s[f"{key}.lora_A{mid}.weight"].shape[0])
            * s[f"{key}.lora_B{mid}.weight"].double()
            @ s[f"{key}.lora_A{mid}.weight"].double()
            for w, s in zip([1.0, 2.0, 1.0], states)
        )
        r = A.shape[0]
        err = float((ref - lora_scaling(ALPHA, r) * B @ A).norm())
        assert (err - best_rank_error(ref, r)) / float(ref.norm()) <= 1e-5, module


def test_load_adapter_state_rejects_wrong_rank(tiny):
    model, _ = _peft(tiny, {t: 4 for t in TARGETS}, seed=0)
    other, _ = _peft(tiny, {t: 8 for t in TARGETS}, seed=0)
    with pytest.raises(ValueError, match="received .* the model's adapter is"):
        load_adapter_state(model, adapter_state(other))


def _one_step(model, tokens):
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    opt.step()


def test_rank_above_rank_of_delta_still_learns(tiny):
    """Round 0 (ΔW = 0) and a ΔW of rank 2 sent to rank-8 clients: extra directions must learn."""
    zero_client, _ = _peft(tiny, {t: 4 for t in TARGETS}, seed=0)  # peft init: B = 0 => ΔW = 0
    low_client, _ = _peft(tiny, {t: 2 for t in TARGETS}, seed=1)
    _randomise(low_client, seed=2)
    tokens = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for state, kept in ((adapter_state(zero_client), 0), (adapter_state(low_client), 2)):
        update = aggregate([state], [1.0], lora_alpha=ALPHA, seed=3)
        proj = update.project(8, lora_alpha=ALPHA)
        receiver, _ = _peft(tiny, {t: 8 for t in TARGETS}, seed=5)
        load_adapter_state(receiver, proj)
        before = adapter_state(receiver)
        for module in _modules(before):
            A, B = before[f"{module}.lora_A.weight"], before[f"{module}.lora_B.weight"]
            assert torch.count_nonzero(B[:, kept:]) == 0  # no fake energy added
            assert A[kept:].norm(dim=1).min() > 0.1  # peft-like row norm ~ 1/sqrt(3)
            assert kept == 0 or float((A[kept:] @ A[:kept].T).abs().max()) < 1e-5  # orthogonal to kept rows
        _one_step(receiver, tokens)
        after = adapter_state(receiver)
        moved = [float(after[f"{m}.lora_B.weight"][:, kept:].abs().max()) for m in _modules(after)]
        assert max(moved) > 0 and sum(x > 0 for x in moved) >= len(moved) // 2


def test_profiles_resolve_onto_real_modules(tiny):
    base = AutoModelForCausalLM.from_pretrained(tiny)
    shapes = target_shapes(base, TARGETS)
    ranks = sample_ranks("heavy_tail_strong", 0, seed=0, shapes=shapes)
    # tiny k/v are 32 x 64: every r200 rank is clamped to 32, MLP to 64
    assert all(r <= min(shapes[m]) for m, r in ranks.items()) and set(ranks) == set(shapes)


@pytest.mark.parametrize("fmt", ["peft", "fs"])
def test_exported_adapter_reproduces_delta(tiny, tmp_path, fmt):
    from peft import PeftModel

    from flexlora_plugin.core import adapter_error, save_peft_adapter

    states = []
    for i, r in enumerate((2, 4, 8)):
        model, _ = _peft(tiny, {t: r for t in TARGETS}, seed=i)
        _randomise(model, seed=20 + i)
        states.append(
            adapter_state(model) if fmt == "peft" else {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}
        )
    update = aggregate(states, [1.0, 1.0, 2.0], lora_alpha=ALPHA)
    ranks = save_peft_adapter(update, tmp_path / "adapter", base_model_name_or_path=str(tiny), lora_alpha=ALPHA)
    errors = adapter_error(update, tmp_path / "adapter")
    assert set(errors) == set(ranks) and max(errors.values()) <= 1e-5
    assert all(r <= 14 for r in ranks.values()) and max(ranks.values()) > 8  # stacked rank 14, clamped by k/v (32)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "adapter")
    held = adapter_state(loaded)
    assert set(_modules(held)) == set(ranks)  # every exported module is loaded, none added
    mid = "" if fmt == "peft" else ".default"
    for module in _modules(held):
        A, B = held[f"{module}.lora_A.weight"].double(), held[f"{module}.lora_B.weight"].double()
        ref = sum(
            w
            / 4
            * lora_scaling(ALPHA, s[f"{module}.lora_A{mid}.weight"].shape[0])
            * s[f"{module}.lora_B{mid}.weight"].double()
            @ s[f"{module}.lora_A{mid}.weight"].double()
            for w, s in zip([1.0, 1.0, 2.0], states)
        )
        assert A.shape[0] == ranks[module]
        rel = float((ref - lora_scaling(ALPHA, A.shape[0]) * B @ A).norm() / ref.norm())
        assert rel <= 1e-5, module
        assert errors[module] == pytest.approx(rel, abs=1e-7), module  # adapter_error agrees with this reference


def test_adapter_error_sees_a_truncated_export(tiny, tmp_path):
    from flexlora_plugin.core import adapter_error, save_peft_adapter

    states = []
    for i, r in enumerate((4, 8)):
        model, _ = _peft(tiny, {t: r for t in TARGETS}, seed=i)
        _randomise(model, seed=40 + i)
        states.append(adapter_state(model))
    update = aggregate(states, [1.0, 1.0], lora_alpha=ALPHA)
    save_peft_adapter(update, tmp_path / "cut", base_model_name_or_path=str(tiny), lora_alpha=ALPHA, ranks=2)
    errors = adapter_error(update, tmp_path / "cut")
    for module, err in errors.items():
        best = best_rank_error(update.delta(module).double(), 2) / float(update.delta(module).double().norm())
        assert err == pytest.approx(best, rel=1e-4) and err > 1e-2, module  # the optimal rank-2 residual, not ~0
