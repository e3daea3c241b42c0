"""fedavg and hetlora against independent references."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import RankError, aggregate
from tests.conftest import make_client

SHAPES = {"a.q_proj": (20, 16), "a.v_proj": (12, 16)}


def test_fedavg_means_of_factors(gen):
    states = [make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen) for _ in range(3)]
    w = [1.0, 2.0, 5.0]
    update = aggregate(states, w, lora_alpha=8, method="fedavg")
    for m in SHAPES:
        A = sum(wi / 8 * s[f"{m}.lora_A.weight"].double() for wi, s in zip(w, states))
        B = sum(wi / 8 * s[f"{m}.lora_B.weight"].double() for wi, s in zip(w, states))
        assert torch.allclose(update.delta(m).double(), 2.0 * B @ A, atol=1e-5)
        proj = update.project(4, lora_alpha=8)
        assert torch.allclose(proj[f"{m}.lora_A.weight"].double(), A, atol=1e-6)
        assert torch.allclose(proj[f"{m}.lora_B.weight"].double(), B, atol=1e-6)


def test_fedavg_rejects_mixed_ranks(gen):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (4, 8)]
    with pytest.raises(RankError, match=r"mixed client ranks in 2 module\(s\): a.q_proj: \{0: 4, 1: 8\}"):
        aggregate(states, [1, 1], lora_alpha=8, method="fedavg")


def test_fedavg_project_other_rank(gen):
    update = aggregate([make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen)], [1], lora_alpha=8, method="fedavg")
    with pytest.raises(RankError, match="has rank 4, a client of rank 8"):
        update.project(8, lora_alpha=8)


@pytest.mark.parametrize("weighting", ["data", "norm"])
def test_hetlora_pad_align_truncate(gen, weighting):
    ranks = (2, 4, 8)
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in ranks]
    w = [3.0, 1.0, 1.0]
    alpha, R = 16.0, 10
    update = aggregate(states, w, lora_alpha=alpha, method="hetlora", max_rank=R, hetlora_weighting=weighting)
    for m, (d_out, d_in) in SHAPES.items():
        if weighting == "data":
            p = [x / sum(w) for x in w]
        else:
            norms = [
                alpha / r * float((s[f"{m}.lora_B.weight"].double() @ s[f"{m}.lora_A.weight"].double()).norm())
                for r, s in zip(ranks, states)
            ]
            p = [x / sum(norms) for x in norms]
        A = torch.zeros(R, d_in, dtype=torch.float64)
        B = torch.zeros(d_out, R, dtype=torch.float64)
        for pk, r, s in zip(p, ranks, states):
            A[:r] += pk * math.sqrt(alpha / r) * s[f"{m}.lora_A.weight"].double()
            B[:, :r] += pk * math.sqrt(alpha / r) * s[f"{m}.lora_B.weight"].double()
        assert torch.allclose(update.delta(m).double(), B @ A, atol=1e-5)
        for r in (2, 8, 10):
            proj = update.project(r, lora_alpha=alpha)
            got = alpha / r * proj[f"{m}.lora_B.weight"].double() @ proj[f"{m}.lora_A.weight"].double()
            assert torch.allclose(got, B[:, :r] @ A[:r], atol=1e-5)
    with pytest.raises(RankError, match="padded to rank 10"):
        update.project(11, lora_alpha=alpha)


def test_hetlora_defaults_to_largest_rank_and_rejects_larger(gen):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (2, 6)]
    update = aggregate(states, [1, 1], lora_alpha=8, method="hetlora")
    assert update.factors["a.q_proj"][0].shape == (6, 16)
    with pytest.raises(RankError, match="above max_rank=4"):
        aggregate(states, [1, 1], lora_alpha=8, method="hetlora", max_rank=4)


def test_hetlora_is_not_flexlora(gen):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in (2, 8)]
    het = aggregate(states, [1, 1], lora_alpha=8, method="hetlora").project(4, lora_alpha=8)
    flex = aggregate(states, [1, 1], lora_alpha=8).project(4, lora_alpha=8)
    prod = lambda p: p["a.q_proj.lora_B.weight"] @ p["a.q_proj.lora_A.weight"]  # noqa: E731
    assert float((prod(het) - prod(flex)).norm()) > 1e-3 * float(prod(flex).norm())


def test_a_registered_method_aggregates_saves_restores_and_exports(gen, tmp_path):
    """Methods live in a registry: save, load and export dispatch through the update's own hooks."""
    from flexlora_plugin.core import (
        FedAvgUpdate,
        FlexLoRAConfig,
        adapter_error,
        list_methods,
        load_server_state,
        register_method,
        save_peft_adapter,
        save_server_state,
    )

    if "test-fedavg-copy" not in list_methods():

        @register_method("test-fedavg-copy")
        class Copy(FedAvgUpdate):
            pass

    with pytest.raises(ValueError, match="already registered"):
        register_method("fedavg")(FedAvgUpdate)
    with pytest.raises(ValueError, match=r"unknown aggregation method 'nope'; registered: \['flexlora', 'fedavg', 'hetlora'"):
        aggregate([make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen)], [1], lora_alpha=8, method="nope")
    with pytest.raises(ValueError, match="'initial' is not an aggregation method"):
        aggregate([make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen)], [1], lora_alpha=8, method="initial")
    states = [make_client(dict.fromkeys(SHAPES, 4), SHAPES, gen=gen) for _ in range(2)]
    update = aggregate(states, [1, 3], lora_alpha=8, method="test-fedavg-copy")
    assert update.method == "test-fedavg-copy" and FlexLoRAConfig(method="test-fedavg-copy", profile="homo")
    save_server_state(tmp_path / "s.safetensors", update, round=1)
    back = load_server_state(tmp_path / "s.safetensors").update
    assert type(back) is type(update) and all(torch.equal(back.delta(m), update.delta(m)) for m in update.modules)
    save_peft_adapter(back, tmp_path / "adapter", base_model_name_or_path="x", lora_alpha=8)
    assert max(adapter_error(update, tmp_path / "adapter").values()) < 1e-5
