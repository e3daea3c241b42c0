"""Every bad-input case: a clear error naming client/module/shape, or a documented exclusion."""

from __future__ import annotations

import math

import pytest
import torch

from flexlora_plugin.core import (
    FlexLoRAWarning,
    MissingModuleError,
    NonFiniteUpdateError,
    RankError,
    ShapeMismatchError,
    UnsupportedKeyError,
    aggregate,
)
from tests.conftest import make_client, ref_delta

SHAPES = {"q_proj": (16, 12)}


def _c(gen, r=4, **kw):
    return make_client({"q_proj": r}, SHAPES, gen=gen, **kw)


def test_a_and_b_ranks_disagree(gen):
    bad = _c(gen)
    bad["q_proj.lora_B.weight"] = torch.zeros(16, 3)
    with pytest.raises(RankError, match=r"client 1, module q_proj: lora_A is \(4, 12\) but lora_B is \(16, 3\)"):
        aggregate([_c(gen), bad], [1, 1], lora_alpha=8)


def test_rank_above_min_dim(gen):
    with pytest.raises(RankError, match="rank 13 is outside 1..min"):
        aggregate([_c(gen, r=13)], [1], lora_alpha=8)


def test_project_rank_above_min_dim(gen):
    update = aggregate([_c(gen)], [1], lora_alpha=8)
    with pytest.raises(RankError, match="rank 13 exceeds min"):
        update.project(13, lora_alpha=8)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_client_is_excluded_and_logged(gen, value):
    good, bad = _c(gen), _c(gen)
    bad["q_proj.lora_B.weight"][0, 0] = value
    with pytest.warns(FlexLoRAWarning, match="client 1 excluded.*non-finite"):
        update = aggregate([good, bad], [1, 1], lora_alpha=8)
    assert update.clients == (0,) and 1 in update.excluded
    assert torch.allclose(update.delta("q_proj").double(), ref_delta([good], [1], "q_proj", [8]), atol=1e-6)


def test_all_clients_non_finite_raises(gen):
    bad = _c(gen)
    bad["q_proj.lora_A.weight"][:] = math.nan
    with pytest.warns(FlexLoRAWarning), pytest.raises(NonFiniteUpdateError):
        aggregate([bad], [1], lora_alpha=8)


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf])
def test_bad_weights(gen, weight):
    with pytest.raises(ValueError, match="client 1: weight must be a positive finite number"):
        aggregate([_c(gen), _c(gen)], [1, weight], lora_alpha=8)


def test_weights_length_mismatch(gen):
    with pytest.raises(ValueError, match="weights has 1 entries for 2 clients"):
        aggregate([_c(gen), _c(gen)], [1], lora_alpha=8)


def test_empty_client_list():
    with pytest.raises(ValueError, match="at least one client"):
        aggregate([], [], lora_alpha=8)


def test_no_alpha_no_scalings(gen):
    with pytest.raises(ValueError, match="lora_alpha"):
        aggregate([_c(gen)], [1])


@pytest.mark.parametrize(
    "key, hint",
    [
        ("base.q_proj.modules_to_save.default.weight", "modules_to_save"),
        ("base.q_proj.lora_magnitude_vector.default.weight", "DoRA"),
        ("base.q_proj.lora_B.bias", "bias"),
        ("base.embed.lora_embedding_A", "embedding"),
        ("something.else", "not a LoRA"),
    ],
)
def test_unsupported_keys_rejected(gen, key, hint):
    state = _c(gen)
    state[key] = torch.zeros(4, 4)
    with pytest.raises(UnsupportedKeyError, match=hint):
        aggregate([state], [1], lora_alpha=8)


def test_missing_factor(gen):
    state = _c(gen)
    del state["q_proj.lora_B.weight"]
    with pytest.raises(MissingModuleError, match="client 0, module q_proj: lora_B is missing"):
        aggregate([state], [1], lora_alpha=8)


def test_shape_mismatch_between_clients(gen):
    """Without a reference, replies that disagree are refused as a whole, whichever arrives first."""
    other = make_client({"q_proj": 4}, {"q_proj": (16, 20)}, gen=gen)
    for states in ([_c(gen), other], [other, _c(gen)]):
        for on_invalid in ("raise", "exclude"):
            with pytest.raises(ShapeMismatchError, match=r"module q_proj: the replies disagree on its shape \(.*\(16, 20\): 1"):
                aggregate(states, [1, 1], lora_alpha=8, on_invalid=on_invalid)
    with pytest.raises(ShapeMismatchError, match=r"client 1, module q_proj: weight shape \(16, 20\) .* of the server's model"):
        aggregate([_c(gen), other], [1, 1], lora_alpha=8, expected_shapes={"q_proj": (16, 12)})


def test_on_invalid_exclude_keeps_the_round(gen):
    good, bad = _c(gen), _c(gen)
    bad["q_proj.lora_B.weight"] = torch.zeros(16, 3)
    with pytest.warns(FlexLoRAWarning, match="client bad excluded"):
        update = aggregate({"good": good, "bad": bad}, {"good": 1, "bad": 1}, lora_alpha=8, on_invalid="exclude")
    assert update.clients == ("good",) and "lora_A is (4, 12)" in update.excluded["bad"]


def test_expected_rank_mismatch(gen):
    with pytest.raises(RankError, match="client 0, module q_proj: lora_A is \\(4, 12\\), assigned rank 8"):
        aggregate([_c(gen)], [1], lora_alpha=8, expected_ranks=[8])
    with pytest.warns(FlexLoRAWarning):
        update = aggregate([_c(gen), _c(gen)], [1, 1], lora_alpha=8, expected_ranks=[{"q_proj": 4}, 8], on_invalid="exclude")
    assert update.clients == (0,)


def test_non_tensor_and_non_2d_values(gen):
    state = _c(gen)
    state["q_proj.lora_A.weight"] = torch.zeros(4, 12, 1)
    with pytest.raises(ShapeMismatchError, match="must be a 2-D tensor"):
        aggregate([state], [1], lora_alpha=8)


def test_two_adapters_for_one_module(gen):
    state = _c(gen)
    state["q_proj.lora_A.other.weight"] = state["q_proj.lora_A.weight"]
    with pytest.raises(ShapeMismatchError, match="two lora_A keys"):
        aggregate([state], [1], lora_alpha=8)


def test_unknown_method_and_dtype(gen):
    with pytest.raises(ValueError, match="unknown aggregation method"):
        aggregate([_c(gen)], [1], lora_alpha=8, method="fedprox")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compute_dtype"):
        aggregate([_c(gen)], [1], lora_alpha=8, compute_dtype=torch.float16)


def test_project_rank_map_without_match(gen):
    update = aggregate([_c(gen)], [1], lora_alpha=8)
    with pytest.raises(RankError, match="no entry of the rank map"):
        update.project({"v_proj": 4}, lora_alpha=8)
    with pytest.raises(ValueError, match="lora_alpha or scaling"):
        update.project(4)


def test_inputs_are_not_mutated(gen):
    states = [_c(gen), _c(gen, r=8)]
    before = [{k: v.clone() for k, v in s.items()} for s in states]
    update = aggregate(states, [1, 1], lora_alpha=8)
    update.project(6, lora_alpha=8)
    update.delta("q_proj")
    for s, b in zip(states, before):
        assert all(torch.equal(s[k], b[k]) for k in s)


def test_config_aggregate_kwargs_max_rank():
    from flexlora_plugin.core import FlexLoRAConfig

    assert FlexLoRAConfig(method="flexlora").aggregate_kwargs(client_max_rank=30)["max_rank"] == 30
    assert FlexLoRAConfig(method="hetlora").aggregate_kwargs(client_max_rank=30)["max_rank"] == 30
    assert FlexLoRAConfig(method="hetlora", hetlora_max_rank=64).aggregate_kwargs(client_max_rank=30)["max_rank"] == 64
    with pytest.raises(ValueError, match="unknown FlexLoRA config key"):
        FlexLoRAConfig.from_dict({"methd": "flexlora"})
    with pytest.raises(ValueError, match="profile"):
        FlexLoRAConfig(profile="nope")
