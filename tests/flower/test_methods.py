"""The methods beyond FlexLoRA through Flower's real simulation engine, against float64 references from the dumps."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402

from flexlora_plugin.core import common_lora_A, factor_of, split_base_delta  # noqa: E402
from tests.flower.test_simulation import ALPHA, _load, run_table  # noqa: E402

pytestmark = [pytest.mark.flower, pytest.mark.slow]


def test_ffa_lora_sends_B_only_both_ways_and_the_global_B_is_exact(tmp_path, tiny_model, data_path):
    """Round 1 sends B = 0 only; replies carry B only; round 2 sends B_g[:, :r] / s_r with
    B_g = Σ_k p_k s_k pad(B_k), the float64 reference computed here from the dumped replies."""
    table = {"0": 4, "1": 8, "2": 16}
    result, dump = run_table(tmp_path, tiny_model, data_path, "ffa-lora", table, rounds=2)
    for pid in table:
        sent, _ = _load(dump / "round-001" / f"sent-p{pid}.safetensors")
        assert sent and all(factor_of(k)[1] == "lora_B" and not v.any() for k, v in sent.items()), pid
    replies = {pid: _load(dump / "round-001" / f"reply-p{pid}.safetensors") for pid in table}
    total = sum(float(meta["num-examples"]) for _, meta in replies.values())
    B_g: dict[str, torch.Tensor] = {}
    for state, meta in replies.values():
        assert state and all(factor_of(k)[1] == "lora_B" for k in state)  # only B travelled back
        for key, B in state.items():
            r = B.shape[1]
            acc = B_g.setdefault(factor_of(key)[0], torch.zeros(B.shape[0], 16, dtype=torch.float64))
            acc[:, :r] += float(meta["num-examples"]) / total * (ALPHA / r) * B.double()
    for pid, r in table.items():
        sent, _ = _load(dump / "round-002" / f"sent-p{pid}.safetensors")
        assert {factor_of(k)[0] for k in sent} == set(B_g)
        for key, B in sent.items():
            ref = B_g[factor_of(key)[0]][:, :r] / (ALPHA / r)
            assert float((B.double() - ref).norm() / ref.norm()) <= 1e-6, (pid, key)
    history = [h for h in result.metrics["history"] if "clients-ok" in h]
    assert [h["clients-ok"] for h in history] == [3, 3]
    sent_bytes = sum(
        v.numel() * v.element_size() for pid in table for v in _load(dump / "round-002" / f"sent-p{pid}.safetensors")[0].values()
    )
    assert history[1]["bytes-sent"] == sent_bytes  # the metrics count B alone: what travelled


def test_flora_sends_the_running_total_and_a_fresh_lora_each_round(tmp_path, tiny_model, data_path):
    """Round t + 1 sends C_t = Σ_{τ ≤ t} Σ_k p_k s_k B_k A_k (float64 reference from the dumped replies) and a
    fresh LoRA: B = 0, A seeded by (seed, t + 1, module); round 1 is the common start, no correction."""
    table = {"0": 4, "1": 8, "2": 16}
    result, dump = run_table(tmp_path, tiny_model, data_path, "flora", table, rounds=3)
    total: dict[str, torch.Tensor] = {}
    for t in (1, 2, 3):
        for pid, r in table.items():
            sent, _ = _load(dump / f"round-{t:03d}" / f"sent-p{pid}.safetensors")
            factors, deltas = split_base_delta(sent)
            assert set(deltas) == (set(total) if t > 1 else set()), (t, pid)
            for module, ref in total.items():
                delta = deltas[module]
                got = delta[0].double() @ delta[1].double() if isinstance(delta, tuple) else delta.double()
                assert float((got - ref).norm() / ref.norm()) <= 1e-6, (t, pid, module)
            for key, value in factors.items():
                module, factor = factor_of(key)
                if factor == "lora_B":
                    assert not value.any(), (t, pid, key)
                else:
                    want = common_lora_A(module, r, value.shape[1], seed=0, round=None if t == 1 else t)
                    assert torch.equal(value, want), (t, pid, key)
        replies = {pid: _load(dump / f"round-{t:03d}" / f"reply-p{pid}.safetensors") for pid in table}
        weight = sum(float(meta["num-examples"]) for _, meta in replies.values())
        for state, meta in replies.values():
            for key, A in state.items():
                module, factor = factor_of(key)
                if factor == "lora_A":
                    B = state[key.replace(".lora_A.", ".lora_B.")].double()
                    step = float(meta["num-examples"]) / weight * (ALPHA / A.shape[0]) * B @ A.double()
                    total[module] = total.get(module, 0) + step
    history = [h for h in result.metrics["history"] if "clients-ok" in h]
    assert [h["clients-ok"] for h in history] == [3, 3, 3]
    assert history[2]["bytes-sent"] > history[1]["bytes-sent"] > history[0]["bytes-sent"]  # C_t travels, and grows
