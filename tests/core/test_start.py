"""The round-1 start: one common adapter (B = 0, a prefix of one A per module), whatever the method or host."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import (
    RankError,
    aggregate,
    common_lora_A,
    initial_update,
    load_server_state,
    module_infos,
    module_infos_of,
    save_server_state,
)
from tests.conftest import make_client

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 48), "model.layers.0.mlp.down_proj": (48, 96)}
MAPS = [dict.fromkeys(SHAPES, 4), dict.fromkeys(SHAPES, 16), {"q_proj": 8, "down_proj": 30}]


def test_each_rank_gets_a_prefix_of_one_common_A_and_zero_B():
    init = initial_update(module_infos(SHAPES), MAPS, seed=3)
    sent = [init.project(m, lora_alpha=16.0) for m in MAPS]
    for name, (d_out, d_in) in SHAPES.items():
        a_key, b_key = f"base_model.model.{name}.lora_A.weight", f"base_model.model.{name}.lora_B.weight"
        top = max(int(s[a_key].shape[0]) for s in sent)
        full = common_lora_A("base_model.model." + name, top, d_in, seed=3)
        for state in sent:
            A, B = state[a_key], state[b_key]
            r = A.shape[0]
            assert B.shape == (d_out, r) and not B.any()
            assert torch.equal(A, full[:r]) and A.dtype == torch.float32
    assert sent[2]["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape[0] == 30
    # the same seed and client rank give identical factors (two calls, two updates)
    again = initial_update(module_infos(SHAPES), MAPS, seed=3).project(MAPS[0], lora_alpha=8.0)
    assert all(torch.equal(again[k], v) for k, v in sent[0].items())


def test_common_A_is_peft_init_seeded_by_run_and_module():
    d_in = 400
    A = common_lora_A("model.layers.0.self_attn.q_proj", 64, d_in, seed=0).double()
    bound = 1 / math.sqrt(d_in)  # peft: kaiming_uniform_(a=√5) -> U(-1/√d_in, 1/√d_in)
    assert A.abs().max() <= bound and A.abs().max() > 0.99 * bound
    assert abs(float(A.mean())) < 0.02 * bound and abs(float(A.var()) / (bound**2 / 3) - 1) < 0.05
    assert torch.equal(common_lora_A("model.layers.0.self_attn.q_proj", 8, d_in, seed=0), A[:8].float())
    assert not torch.equal(common_lora_A("model.layers.0.self_attn.q_proj", 8, d_in, seed=1), A[:8].float())
    assert not torch.equal(common_lora_A("model.layers.1.self_attn.q_proj", 8, d_in, seed=0), A[:8].float())
    # peft's own bound for the same layer, measured
    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential()
    net.add_module("q_proj", torch.nn.Linear(d_in, 32))
    peft_A = (
        get_peft_model(net, LoraConfig(r=64, target_modules=["q_proj"])).base_model.model.q_proj.lora_A["default"].weight.detach()
    )
    assert float(peft_A.abs().max()) <= bound and float(peft_A.abs().max()) > 0.99 * bound


def test_both_key_formats_draw_the_same_A():
    """FederatedScope keys (``…lora_A.default.weight``) and peft's (``…lora_A.weight``) seed alike."""
    gen = torch.Generator().manual_seed(0)
    fs_template = make_client(
        {f"base_model.model.{m}": 8 for m in SHAPES},
        {f"base_model.model.{m}": s for m, s in SHAPES.items()},
        gen=gen,
        adapter="default",
    )
    fs = initial_update(module_infos_of(fs_template), MAPS[:2], seed=5).project(16, lora_alpha=16.0)
    flower = initial_update(module_infos(SHAPES), MAPS[:2], seed=5).project(16, lora_alpha=16.0)
    assert set(fs) == {k.replace(".weight", ".default.weight") for k in flower}
    for key, value in flower.items():
        assert torch.equal(fs[key.replace(".weight", ".default.weight")], value)


def test_rank_is_capped_by_the_module_and_bad_requests_fail():
    init = initial_update(module_infos({"m.q_proj": (6, 10)}), [{"q_proj": 200}], seed=0)
    assert init.project({"q_proj": 6}, lora_alpha=1.0)["base_model.model.m.q_proj.lora_A.weight"].shape == (6, 10)
    small = initial_update(module_infos(SHAPES), [dict.fromkeys(SHAPES, 4)], seed=0)
    with pytest.raises(RankError, match="drawn at rank 4"):
        small.project(8, lora_alpha=16.0)
    with pytest.raises(RankError, match="at least one"):
        initial_update(module_infos(SHAPES), [], seed=0)
    assert all(v == 1.0 for v in small.energy_kept(4).values())  # ΔW = 0: nothing to lose


def test_initial_update_survives_a_checkpoint(tmp_path):
    init = initial_update(module_infos(SHAPES), MAPS, seed=2)
    path = save_server_state(tmp_path / "s.safetensors", init, round=0, seed=2)
    back = load_server_state(path).update
    assert back is not None and back.method == "initial"
    want, got = init.project(MAPS[2], lora_alpha=16.0), back.project(MAPS[2], lora_alpha=16.0)
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("method", ["hetlora", "fedavg"])
def test_baselines_train_every_row_from_the_common_start(method):
    """From the common start every row of A of a high-rank client is live (HetLoRA's zero-padded start was not)."""
    maps = [dict.fromkeys(SHAPES, 4), dict.fromkeys(SHAPES, 16)] if method == "hetlora" else [dict.fromkeys(SHAPES, 8)] * 2
    init = initial_update(module_infos(SHAPES), maps, seed=0)
    states = {k: dict(init.project(m, lora_alpha=16.0)) for k, m in enumerate(maps)}
    gen = torch.Generator().manual_seed(0)
    for state in states.values():  # one "training step": B moves off zero
        for key in [k for k in state if ".lora_B." in k]:
            state[key] = 0.01 * torch.randn(state[key].shape, generator=gen)
    update = aggregate(states, {0: 1.0, 1: 3.0}, method=method, lora_alpha=16.0, max_rank=max(max(m.values()) for m in maps))
    top = maps[-1]
    got = update.project(top, lora_alpha=16.0)
    for key, A in got.items():
        if ".lora_A." in key:
            assert (A.abs().sum(dim=1) > 0).all(), key  # no dead (all-zero) row
