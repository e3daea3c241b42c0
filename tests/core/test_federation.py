"""core.Federation: the server side of a round, against float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import FlexLoRAConfig, FlexLoRAError, RankError, common_lora_A, module_infos
from flexlora_plugin.core.federation import Federation, Reply
from flexlora_plugin.core.profiles import sample_ranks
from tests.conftest import best_rank_error, make_client, ref_delta

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}
PREFIX = "base_model.model."
ALPHA = 16.0


def _fed(tmp_path=None, **config) -> Federation:
    cfg = FlexLoRAConfig(**{"lora_alpha": ALPHA, **config})
    return Federation(
        cfg, module_infos(SHAPES), shapes=SHAPES, state_path=None if tmp_path is None else tmp_path / "s.safetensors"
    )


def _reply(ranks: dict[str, int], gen: torch.Generator, n: float = 10.0, loss: float = 1.0) -> Reply:
    state = make_client({PREFIX + m: r for m, r in ranks.items()}, {PREFIX + m: s for m, s in SHAPES.items()}, gen=gen)
    return Reply(state, n, loss)


def _factors(state: dict[str, torch.Tensor], module: str) -> tuple[torch.Tensor, torch.Tensor]:
    return state[f"{PREFIX}{module}.lora_A.weight"].double(), state[f"{PREFIX}{module}.lora_B.weight"].double()


def test_ranks_drawn_from_the_profile_and_checked_when_reported():
    fed = _fed(profile="uniform")
    assert fed.draw_ranks(3) == sample_ranks("uniform", 3, 0, shapes=SHAPES)
    q, down = SHAPES
    assert fed.assign_ranks("a", {q: 4, down: 8}) == {q: 4, down: 8}
    with pytest.raises(RankError, match=r"client 'b': 2 rank map entries name no adapted module .*exactly\): 'q_proj'"):
        fed.assign_ranks("b", {"q_proj": 2, "down_proj": 16})  # a reported map names modules exactly: no suffixes
    with pytest.raises(
        RankError, match=r"client 'x', module model.layers.0.self_attn.q_proj \(24×16\): rank must be in 1..16, got 1000000000"
    ):
        fed.assign_ranks("x", {q: 10**9, down: 8})
    with pytest.raises(RankError, match="client 'x': no rank for module model.layers.0.mlp.down_proj"):
        fed.assign_ranks("x", {q: 4})
    with pytest.raises(RankError, match=r"client 'x': 1 rank map entries name no adapted module .*: 'k_proj'"):
        fed.assign_ranks("x", {q: 4, down: 4, "k_proj": 4})
    with pytest.raises(RankError, match="got True"):
        fed.assign_ranks("x", {q: True, down: 4})
    assert "x" not in fed.rank_maps


def test_round1_sends_the_common_start_at_each_clients_rank():
    fed = _fed(profile="homo")
    for client, r in (("a", 4), ("b", 12)):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    for client, r in (("a", 4), ("b", 12)):
        sent = fed.factors_for(client)
        for module, (d_out, _) in SHAPES.items():
            A, B = _factors(sent, module)
            common = common_lora_A(PREFIX + module, 12, SHAPES[module][1], seed=0)
            assert torch.equal(B, torch.zeros(d_out, r, dtype=torch.float64))
            assert torch.allclose(A, common[:r].double())


def test_a_round_matches_an_independent_float64_reference():
    gen = torch.Generator().manual_seed(0)
    fed = _fed(profile="homo")
    ranks = {"a": 4, "b": 8, "c": 12}
    for client, r in ranks.items():
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    replies = {
        c: _reply(dict.fromkeys(SHAPES, r), gen, n=n, loss=loss)
        for (c, r), n, loss in zip(ranks.items(), (10, 30, 60), (2.0, 1.0, 4.0))
    }
    result = fed.aggregate(replies, bytes_sent=123)
    assert result.updated and result.kept == ["a", "b", "c"] and result.excluded == {} and result.round == 1
    assert result.train_loss == pytest.approx((10 * 2 + 30 * 1 + 60 * 4) / 100) and result.num_examples == 100
    assert result.bytes_sent == 123 and result.bytes_received == sum(
        4 * v.numel() for r in replies.values() for v in r.state.values()
    )
    states = [r.state for r in replies.values()]
    for module in SHAPES:
        ref = ref_delta(states, [10, 30, 60], PREFIX + module, [ALPHA] * 3)
        for client, r in ranks.items():
            A, B = _factors(fed.factors_for(client), module)
            approx = (ALPHA / r) * B @ A
            assert float((ref - approx).norm()) == pytest.approx(best_rank_error(ref, r), rel=1e-4, abs=1e-5), (client, module)
    assert set(result.energy) == {"r4", "r8", "r12"} and all(0 < e <= 1 + 1e-6 for e in result.energy.values())
    assert fed.history == [result.row()] and result.row()["excluded-partitions"] == []


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda r: Reply(r.state, 0), "num-examples must be a positive finite number, at most 2**53, got 0"),
        (lambda r: Reply(r.state, math.nan), "num-examples must be a positive finite number, at most 2**53, got nan"),
        (lambda r: Reply(r.state, True), "num-examples must be a positive finite number, at most 2**53, got True"),
        (lambda r: Reply({k: v.clone().fill_(math.nan) for k, v in r.state.items()}, 5), "non-finite"),
        (lambda r: Reply({k: (v[:-1] if ".lora_A." in k else v[:, :-1]) for k, v in r.state.items()}, 5), "rank"),
    ],
)
def test_a_bad_reply_is_left_out_with_its_reason(bad, reason):
    gen = torch.Generator().manual_seed(1)
    fed = _fed(profile="homo")
    for client in ("good", "bad"):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, 4))
    good = _reply(dict.fromkeys(SHAPES, 4), gen)
    result = fed.aggregate({"good": good, "bad": bad(_reply(dict.fromkeys(SHAPES, 4), gen))}, failed={"gone": "error reply"})
    assert result.kept == ["good"] and result.updated
    assert reason in result.excluded["bad"] and result.excluded["gone"] == "error reply"
    assert set(result.row()["excluded-reasons"]) == {"bad", "gone"}


def test_no_usable_reply_keeps_the_previous_update():
    gen = torch.Generator().manual_seed(2)
    fed = _fed(profile="homo")
    fed.assign_ranks("a", dict.fromkeys(SHAPES, 4))
    fed.aggregate({"a": _reply(dict.fromkeys(SHAPES, 4), gen)})
    before = fed.global_update
    nan = _reply(dict.fromkeys(SHAPES, 4), gen)
    result = fed.aggregate({"a": Reply({k: v.fill_(math.inf) for k, v in nan.state.items()}, 3)})
    assert not result.updated and fed.global_update is before and "no usable reply" in result.excluded["a"]
    assert result.round == 2 and math.isnan(result.train_loss)


def test_state_round_trip_and_the_same_refusals_in_every_host(tmp_path):
    gen = torch.Generator().manual_seed(3)
    fed = _fed(tmp_path, profile="homo", seed=5)
    fed.assign_ranks("a", dict.fromkeys(SHAPES, 4))
    fed.aggregate({"a": _reply(dict.fromkeys(SHAPES, 4), gen)})
    fed.aggregate({"a": _reply(dict.fromkeys(SHAPES, 4), gen)})
    again = _fed(profile="homo", seed=5)
    again.assign_ranks("a", dict.fromkeys(SHAPES, 4))
    assert again.restore(tmp_path / "s.safetensors") == 2 and again.round == 2 and again.history == fed.history
    assert all(torch.equal(again.factors_for("a")[k], v) for k, v in fed.factors_for("a").items())
    with pytest.raises(FlexLoRAError, match="written with seed 5, this run uses seed 6"):
        _fed(profile="homo", seed=6).restore(tmp_path / "s.safetensors")
    with pytest.raises(FlexLoRAError, match="written by method 'flexlora', this run uses 'hetlora'"):
        _fed(profile="homo", seed=5, method="hetlora").restore(tmp_path / "s.safetensors")
    empty = tmp_path / "empty.safetensors"
    _fed(profile="homo").save(empty)
    with pytest.raises(FlexLoRAError, match="holds no global update"):
        _fed(profile="homo").restore(empty)


def test_export_writes_the_largest_client_rank_by_default_and_the_exact_global_update_on_request(tmp_path):
    from flexlora_plugin.core import adapter_error

    gen = torch.Generator().manual_seed(4)
    fed = _fed(profile="homo")
    with pytest.raises(FlexLoRAError, match="nothing to export"):
        fed.export(tmp_path / "none")
    for client, r in (("a", 4), ("b", 8)):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    fed.aggregate({c: _reply(dict.fromkeys(SHAPES, r), gen) for c, r in (("a", 4), ("b", 8))})
    ranks = fed.export(tmp_path / "adapter", base_model_name_or_path="tiny")  # the size a user expects
    errors = adapter_error(fed.global_update, tmp_path / "adapter")
    assert set(ranks.values()) == {8} and 1e-3 < max(errors.values()) < 1.0
    for module in SHAPES:  # the best rank-8 approximation: Eckart–Young, from an independent float64 SVD
        delta = fed.global_update.delta(PREFIX + module).double()
        S = torch.linalg.svdvals(delta)
        assert errors[PREFIX + module] == pytest.approx(float(S[8:].norm() / S.norm()), rel=1e-3)
    ranks = fed.export(tmp_path / "exact", base_model_name_or_path="tiny", ranks="exact")
    assert set(ranks.values()) == {12} and max(adapter_error(fed.global_update, tmp_path / "exact").values()) < 1e-5
    with pytest.raises(ValueError, match="export ranks must be 'max', 'exact', an int or a rank map"):
        fed.export(tmp_path / "bad", ranks="biggest")


def test_a_truncated_export_and_the_cached_adapter(tmp_path):
    from flexlora_plugin.core import adapter_error

    gen = torch.Generator().manual_seed(5)
    fed = _fed(profile="homo")
    for client, r in (("a", 4), ("b", 8)):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    fed.aggregate({c: _reply(dict.fromkeys(SHAPES, r), gen) for c, r in (("a", 4), ("b", 8))})
    tensors, ranks = fed.adapter(3)
    assert fed.adapter(3)[0] is tensors and set(ranks.values()) == {3}  # computed once per update and rank
    fed.export(tmp_path / "r3", base_model_name_or_path="tiny", ranks=3)
    errors = adapter_error(fed.global_update, tmp_path / "r3")
    for module in fed.global_update.modules:  # the truncation error is the Eckart–Young optimum at rank 3
        delta = fed.global_update.delta(module).double()
        assert errors[module] == pytest.approx(best_rank_error(delta, 3) / float(delta.norm()), rel=1e-3)


def test_a_failure_the_host_reports_wins_over_a_reply_for_the_same_client():
    gen = torch.Generator().manual_seed(6)
    fed = _fed(profile="homo")
    for client in ("a", "b"):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, 4))
    result = fed.aggregate(
        {"a": _reply(dict.fromkeys(SHAPES, 4), gen), "b": _reply(dict.fromkeys(SHAPES, 4), gen)}, failed={"a": "two replies"}
    )
    assert result.kept == ["b"] and result.excluded == {"a": "two replies"} and fed.global_update.clients == ("b",)


def test_drop_after_failures_is_opt_in_counts_rounds_in_a_row_and_survives_a_resume(tmp_path):
    gen = torch.Generator().manual_seed(4)
    ranks = dict.fromkeys(SHAPES, 4)

    def round_(fed, failing):
        replies = {c: _reply(ranks, gen) for c in (1, 2, 3) if c not in failing}
        return fed.aggregate(replies, failed={c: "error reply" for c in failing})

    off = _fed(profile="homo")
    on = _fed(tmp_path, profile="homo", drop_after_failures=2)
    for fed in (off, on):
        for c in (1, 2, 3):
            fed.assign_ranks(c, ranks)
    for failing in ({2, 3}, {3}, {2, 3}):  # 3 fails three rounds in a row; 2 fails, recovers, fails again
        results = [round_(fed, failing) for fed in (off, on)]
    assert off.dropped == {} and off.eligible([3, 1, 2]) == [1, 2, 3]
    assert on.dropped == {3: 2} and on.failures == {1: 0, 2: 1, 3: 3}
    assert on.eligible([3, 1, 2]) == [1, 2]
    assert results[1].dropped == [] and on.history[1]["dropped-partitions"] == [3]
    resumed = _fed(profile="homo", drop_after_failures=2)
    resumed.restore(tmp_path / "s.safetensors")
    assert resumed.dropped == {3: 2} and resumed.failures == on.failures and resumed.eligible([1, 2, 3]) == [1, 2]
    with pytest.raises(ValueError, match="drop_after_failures must be an int >= 0"):
        FlexLoRAConfig(drop_after_failures=-1)


def test_server_device_is_checked_when_configured_and_when_the_federation_starts():
    with pytest.raises(ValueError, match="server_device: device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        FlexLoRAConfig(server_device="gpu")
    assert _fed().server_device is None  # the default: aggregation on the CPU, as before
    assert _fed(server_device="auto").server_device == (torch.device("cuda") if torch.cuda.is_available() else None)
    assert not _fed().pin_replies  # page-locked replies only for a CUDA server
    assert _fed(server_device="auto").pin_replies == torch.cuda.is_available()
    if not torch.cuda.is_available():  # a GPU asked for and missing fails before round 1, not in it
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            _fed(server_device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_round_aggregated_on_the_gpu_serves_the_best_rank_r_factors():
    fed = _fed(server_device="cuda")
    gen = torch.Generator().manual_seed(3)
    ranks, weights = {"a": 4, "b": 12, "c": 16}, [1.0, 2.0, 3.0]
    replies = {c: _reply(dict.fromkeys(SHAPES, r), gen, n=w) for (c, r), w in zip(ranks.items(), weights)}
    for c, r in ranks.items():
        fed.assign_ranks(c, dict.fromkeys(SHAPES, r))
    assert fed.aggregate(replies).updated and fed.global_update.device.type == "cuda"
    states = [r.state for r in replies.values()]
    for c, r in ranks.items():
        sent = fed.factors_for(c)
        for module in SHAPES:
            ref = ref_delta(states, weights, PREFIX + module, [ALPHA] * 3)  # float64, written in tests/conftest.py
            A, B = _factors(sent, module)
            assert A.device.type == "cpu"
            err = float((ref - (ALPHA / r) * B @ A).norm())
            assert (err - best_rank_error(ref, r)) / float(ref.norm()) <= 1e-5, (c, module)


@pytest.mark.parametrize("method", ["flexlora", "hetlora", "flora"])
def test_the_default_export_after_a_round_of_low_rank_replies_is_the_update_itself(tmp_path, method):
    """Largest client rank 8, but only a rank-4 client replied: the export reproduces ΔW (no error, no refusal)."""
    from flexlora_plugin.core import adapter_error

    gen = torch.Generator().manual_seed(6)
    fed = _fed(profile="homo", method=method)
    for client, r in (("a", 4), ("b", 8)):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, r))
    fed.aggregate({"a": _reply(dict.fromkeys(SHAPES, 4), gen)})
    ranks = fed.export(tmp_path / "adapter", base_model_name_or_path="tiny")
    assert max(ranks.values()) <= 8 and max(adapter_error(fed.global_update, tmp_path / "adapter").values()) < 1e-5
