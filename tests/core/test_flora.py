"""FLoRA: the round's exact stack, the running total every client merges into its base, a fresh LoRA per round.

References are float64 sums written here from the equations ``ΔW_t = Σ_k p_k s_k B_k A_k`` and
``C_t = Σ_{τ ≤ t} ΔW_τ``.
"""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import (
    ClientModel,
    FlexLoRAConfig,
    UnsupportedKeyError,
    common_lora_A,
    load_server_state,
    module_infos,
    rebuild_base,
    split_base_delta,
)
from flexlora_plugin.core.federation import Federation, Reply
from tests.conftest import make_client

SHAPES = {"model.l0.q_proj": (64, 48), "model.l0.down_proj": (48, 80)}  # dense once R (d_out + d_in) >= d_out d_in
PREFIX = "base_model.model."
TABLE = {"0": 2, "1": 4, "2": 8}
WEIGHTS = [3.0, 1.0, 6.0]
ALPHA = 16.0
SEED = 5


def _fed(tmp_path=None) -> Federation:
    cfg = FlexLoRAConfig(method="flora", lora_alpha=ALPHA, seed=SEED, rank_table=TABLE)
    path = None if tmp_path is None else tmp_path / "state.safetensors"
    fed = Federation(cfg, module_infos(SHAPES), shapes=SHAPES, state_path=path)
    for c in range(3):
        fed.draw_ranks(c)
    return fed


def _replies(gen) -> dict[int, Reply]:
    full = {PREFIX + m: s for m, s in SHAPES.items()}
    return {c: Reply(make_client(dict.fromkeys(full, TABLE[str(c)]), full, gen=gen), WEIGHTS[c]) for c in range(3)}


def _round_reference(replies: dict[int, Reply], module: str) -> torch.Tensor:
    """ΔW_t = Σ_k p_k (alpha / r_k) B_k A_k in float64."""
    total = sum(r.num_examples for r in replies.values())
    out = 0
    for reply in replies.values():
        A, B = reply.state[f"{module}.lora_A.weight"].double(), reply.state[f"{module}.lora_B.weight"].double()
        out = out + reply.num_examples / total * (ALPHA / A.shape[0]) * B @ A
    return out


def _correction(sent: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    _, deltas = split_base_delta(sent)
    delta = deltas[module]
    return (delta[0].double() @ delta[1].double()) if isinstance(delta, tuple) else delta.double()


def test_the_running_total_is_the_sum_of_the_rounds_and_clients_get_a_fresh_lora(gen):
    fed = _fed()
    history = []
    for t in (1, 2, 3):
        replies = _replies(gen)
        assert fed.aggregate(replies).updated
        history.append({PREFIX + m: _round_reference(replies, PREFIX + m) for m in SHAPES})
        update = fed.global_update
        assert update.method == "flora" and update.round == t
        for module in update.modules:
            ref = history[-1][module]
            assert float((update.delta(module).double() - ref).norm() / ref.norm()) <= 1e-6, (t, module)
            total = sum(h[module] for h in history)
            for c in range(3):
                sent = fed.factors_for(c)
                got = _correction(sent, module)
                assert float((got - total).norm() / total.norm()) <= 1e-6, (t, c, module)
                r, d_in = TABLE[str(c)], SHAPES[module.removeprefix(PREFIX)][1]
                assert torch.equal(sent[f"{module}.lora_A.weight"], common_lora_A(module, r, d_in, seed=SEED, round=t + 1))
                assert not sent[f"{module}.lora_B.weight"].any()
        _, deltas = split_base_delta(fed.factors_for(0))
        _, again = split_base_delta(fed.factors_for(1))
        for module, delta in deltas.items():  # one running total for every client's message, not a copy each
            assert (
                all(x is y for x, y in zip(delta, again[module], strict=True))
                if isinstance(delta, tuple)
                else delta is again[module]
            )
        held_as_factors = all(isinstance(d, tuple) for d in deltas.values())
        assert held_as_factors == (t == 1), t  # R = 14 after round 1 (dense from 27.4 and 30), 28 after round 2
    assert fed.energy_kept(0) == dict.fromkeys(fed.global_update.modules, 1.0)


def test_round_one_is_every_methods_common_start_without_a_correction():
    fed = _fed()
    sent = fed.factors_for(2)
    rest, deltas = split_base_delta(sent)
    assert deltas == {} and rest == sent
    for module, (_, d_in) in ((PREFIX + m, s) for m, s in SHAPES.items()):
        assert torch.equal(sent[f"{module}.lora_A.weight"], common_lora_A(module, 8, d_in, seed=SEED))


def test_a_resumed_federation_continues_the_total_and_exports_it(gen, tmp_path):
    from flexlora_plugin.core.export import export_adapter

    fed = _fed(tmp_path)
    rounds = [_replies(gen) for _ in range(2)]
    fed.aggregate(rounds[0])
    fed.save(tmp_path / "state.safetensors")
    again = _fed()
    again.restore(tmp_path / "state.safetensors")
    for key, value in fed.factors_for(1).items():
        assert torch.equal(again.factors_for(1)[key], value), key
    fed.aggregate(rounds[1])
    again.aggregate(rounds[1])
    for key, value in fed.factors_for(1).items():
        assert torch.equal(again.factors_for(1)[key], value), key
    restored = load_server_state(fed.save(tmp_path / "s2.safetensors")).update
    assert restored.round == 2
    tensors, ranks = export_adapter(restored, lora_alpha=ALPHA)
    for m in SHAPES:
        module = PREFIX + m
        total = sum(_round_reference(r, module) for r in rounds)
        A, B = tensors[f"{module}.lora_A.weight"].double(), tensors[f"{module}.lora_B.weight"].double()
        assert float(((ALPHA / ranks[module]) * B @ A - total).norm() / total.norm()) <= 1e-5, module
    from flexlora_plugin.core import adapter_error, save_peft_adapter

    save_peft_adapter(restored, tmp_path / "adapter", base_model_name_or_path="tiny", lora_alpha=ALPHA)
    assert max(adapter_error(restored, tmp_path / "adapter").values()) <= 1e-5  # checked against C_T, what was exported


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from flexlora_plugin.tools.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny", max_length=128)


def _client(tiny, method="flora"):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny))
    return ClientModel(base, lora_alpha=ALPHA, target_modules=("q_proj", "down_proj"), method=method, seed=SEED)


def _payloads(cm, gen):
    """A federation over the client's own modules: the payloads of rounds 1, 2 and 4 for client 2."""
    cfg = FlexLoRAConfig(method="flora", lora_alpha=ALPHA, seed=SEED, rank_table={"0": 2, "1": 4, "2": 4})
    fed = Federation(cfg, module_infos(cm.shapes), shapes=cm.shapes)
    for c in range(3):
        fed.draw_ranks(c)
    full = {PREFIX + m: s for m, s in cm.shapes.items()}
    out = {1: fed.factors_for(2)}
    for t in (1, 2, 3):
        fed.aggregate({c: Reply(make_client(dict.fromkeys(full, 2 if c == 0 else 4), full, gen=gen), 1.0) for c in range(3)})
        out[t + 1] = fed.factors_for(2)
    return fed.rank_for(2), out


def _base_weights(cm):
    return {name: p.detach().clone() for name, p in cm.model.named_parameters() if "base_layer.weight" in name}


def test_a_client_sampled_in_rounds_1_and_4_starts_from_w0_plus_c3_like_a_fresh_process(tiny, gen):
    first = _client(tiny)
    ranks, payloads = _payloads(first, gen)
    first.activate(ranks, payloads[1])  # round 1: W_0, a common-start LoRA
    w0 = _base_weights(first)
    first.activate(ranks, payloads[2])  # the process serves another partition in round 2: W_0 + C_1
    first.activate(ranks, payloads[4])  # sampled again in round 4: W_0 + C_3, not W_0 + C_1 + C_3
    fresh = _client(tiny)
    fresh.activate(ranks, payloads[4])  # another process, never sampled before
    got, other = _base_weights(first), _base_weights(fresh)
    _, deltas = split_base_delta(payloads[4])
    assert deltas
    for name, W in got.items():
        module = name.split(".base_layer.")[0]
        assert torch.equal(W, other[name]), name  # bit-identical, whatever the client did before
        want = rebuild_base(w0[name], deltas[module]) if module in deltas else w0[name]
        assert torch.equal(W, want), name
    first.activate(ranks, payloads[1])  # a message without a correction: back to W_0
    assert all(torch.equal(W, w0[n]) for n, W in _base_weights(first).items())


def test_a_correction_reaches_only_a_cumulative_methods_client(tiny, gen):
    cm = _client(tiny, method="flexlora")
    ranks, payloads = _payloads(_client(tiny), gen)
    with pytest.raises(UnsupportedKeyError, match="takes none"):
        cm.activate(ranks, payloads[2])
