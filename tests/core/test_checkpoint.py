"""Server state round trip through safetensors; no pickles accepted."""

from __future__ import annotations

import pickle

import pytest
import torch

from flexlora_plugin.core import FlexLoRAError, aggregate, load_server_state, save_server_state
from tests.conftest import make_client

SHAPES = {"x.q_proj": (24, 16), "x.down_proj": (16, 30)}


@pytest.mark.parametrize("method", ["flexlora", "fedavg", "hetlora"])
@pytest.mark.parametrize("ranks", [(4, 4), (8, 8, 8)])  # factored / dense path for flexlora
def test_round_trip_projects_identically(tmp_path, gen, method, ranks):
    states = [make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen) for r in ranks]
    update = aggregate(states, [1.0] * len(ranks), lora_alpha=16, method=method, seed=5)
    path = save_server_state(tmp_path / "state.safetensors", update, round=3, seed=5, max_rank=12, extra={"sampled": [1, 2]})
    state = load_server_state(path)
    assert state.round == 3 and state.seed == 5 and state.extra == {"sampled": [1, 2]}
    assert state.update is not None and state.update.method == method and state.update.modules == update.modules
    r = ranks[0]
    before, after = update.project(r, lora_alpha=16), state.update.project(r, lora_alpha=16)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.allclose(before[k], after[k], atol=1e-6), k
    for m in SHAPES:
        if method == "flexlora" and not update.uses_factored_path(m):  # saved at max_rank=12 < min(d)
            with pytest.raises(FlexLoRAError, match="only its top 12 triplets"):
                state.update.delta(m)
        else:
            assert torch.allclose(update.delta(m), state.update.delta(m), atol=1e-5)


def test_restored_dense_update_refuses_ranks_it_cannot_serve(tmp_path, gen):
    states = [make_client(dict.fromkeys(SHAPES, 8), SHAPES, gen=gen) for _ in range(3)]
    update = aggregate(states, [1, 1, 1], lora_alpha=16)
    state = load_server_state(save_server_state(tmp_path / "s.safetensors", update, round=1, max_rank=4))
    state.update.project(4, lora_alpha=16)
    with pytest.raises(FlexLoRAError, match="holds 4 triplets, rank 6"):
        state.update.project(6, lora_alpha=16)


def test_empty_state_and_foreign_files(tmp_path):
    state = load_server_state(save_server_state(tmp_path / "empty.safetensors", None, round=0))
    assert state.update is None and state.round == 0
    pkl = tmp_path / "evil.safetensors"
    pkl.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(Exception):  # safetensors refuses to parse a pickle; nothing is unpickled
        load_server_state(pkl)
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FlexLoRAError, match="not a FlexLoRA server state"):
        load_server_state(tmp_path / "plain.safetensors")
