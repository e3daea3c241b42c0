"""Hostile or careless client input at the core's boundary: a typed outcome for each, never a silent wrong answer.

One test per row of the untrusted-clients issue that the core owns. With ``on_invalid="raise"``
each input raises a specific :class:`FlexLoRAError`; with ``"exclude"`` (what both hosts use,
through :class:`Federation`) the client is left out with a reason and the others are aggregated.
"""

from __future__ import annotations

import pytest
import torch

from flexlora_plugin.core import FlexLoRAConfig, MissingModuleError, UnsupportedKeyError, aggregate, module_infos
from flexlora_plugin.core.errors import MagnitudeError, ShapeMismatchError, UnsupportedDtypeError
from flexlora_plugin.core.federation import Federation, Reply
from tests.conftest import make_client, ref_delta

SHAPES = {"base_model.model.l0.q_proj": (12, 10), "base_model.model.l0.v_proj": (8, 10)}


def _good(gen, r=4):
    return make_client(dict.fromkeys(SHAPES, r), SHAPES, gen=gen)


def _both(bad_state, gen, error, reason):
    """Raise ``error`` with on_invalid='raise'; be excluded with ``reason`` beside a good client with 'exclude'."""
    good = _good(gen)
    with pytest.raises(error, match=reason):
        aggregate({"bad": bad_state, "good": good}, {"bad": 1, "good": 1}, lora_alpha=8, on_invalid="raise")
    with pytest.warns(UserWarning):
        update = aggregate({"bad": bad_state, "good": good}, {"bad": 1, "good": 1}, lora_alpha=8, on_invalid="exclude")
    assert update.clients == ("good",) and reason in update.excluded["bad"].replace("\n", " ")
    for m in SHAPES:
        assert torch.allclose(update.delta(m).double(), ref_delta([good], [1], m, [8]), atol=1e-5)


def test_integer_and_bool_factors_are_refused(gen):
    for dtype in (torch.int64, torch.bool, torch.int8):
        bad = {k: v.to(dtype) for k, v in _good(gen).items()}
        _both(bad, gen, UnsupportedDtypeError, "factors must be float16, bfloat16, float32 or float64")


def test_an_empty_state_is_not_a_contributor(gen):
    _both({}, gen, MissingModuleError, "sent no LoRA factor")


def test_a_non_string_key_is_a_typed_exclusion(gen):
    bad = {**_good(gen), 7: torch.zeros(2, 2)}
    _both(bad, gen, UnsupportedKeyError, "key 7 is a int, not a string")


def test_an_update_that_would_overflow_float32_is_refused_before_aggregation(gen):
    bad = {k: v * 1e20 for k, v in _good(gen).items()}  # finite, but s·B·A ~ 1e40 overflows float32
    _both(bad, gen, MagnitudeError, "update too large to aggregate")


def test_weights_near_the_float64_maximum_do_not_overflow(gen):
    a, b = _good(gen), _good(gen)
    big = aggregate([a, b], [1e308, 1e308], lora_alpha=8)
    for m in SHAPES:
        assert torch.allclose(big.delta(m).double(), ref_delta([a, b], [1, 1], m, [8, 8]), atol=1e-5), m


def test_the_optional_norm_bound(gen):
    a, b = _good(gen), {k: v * 100 for k, v in _good(gen).items()}
    with pytest.raises(MagnitudeError, match="above the bound 1e\\+03"):
        aggregate([a, b], [1, 1], lora_alpha=8, max_norm=1e3)
    assert aggregate([a, b], [1, 1], lora_alpha=8, max_norm=1e9).clients == (0, 1)
    with pytest.raises(ValueError, match="max_update_norm must be a positive finite number"):
        FlexLoRAConfig(max_update_norm=0.0)


def test_a_client_with_other_shapes_arriving_first_cannot_win(gen):
    """The server's shapes are the reference: the odd client is out, whatever the order."""
    odd_shapes = {m: (d_out + 1, d_in) for m, (d_out, d_in) in SHAPES.items()}
    odd = make_client(dict.fromkeys(odd_shapes, 4), odd_shapes, gen=gen)
    with pytest.raises(ShapeMismatchError, match=r"differs from \(12, 10\) of the server's model"):
        aggregate({"odd": odd, "good": _good(gen)}, {"odd": 1, "good": 1}, lora_alpha=8, expected_shapes=SHAPES)
    fed = Federation(
        FlexLoRAConfig(profile="homo", lora_alpha=8), module_infos({m[len("base_model.model.") :]: s for m, s in SHAPES.items()})
    )
    for client in ("odd", "good", "good2", "extra"):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, 4))
    result = fed.aggregate({"odd": Reply(odd, 1), "good": Reply(_good(gen), 1), "good2": Reply(_good(gen), 1)})
    assert result.kept == ["good", "good2"] and "of the server's model" in result.excluded["odd"]
    extra = {
        **_good(gen),
        "base_model.model.l0.k_proj.lora_A.weight": torch.zeros(4, 10),
        "base_model.model.l0.k_proj.lora_B.weight": torch.zeros(12, 4),
    }
    result = fed.aggregate({"extra": Reply(extra, 1), "good": Reply(_good(gen), 1)})
    assert "module base_model.model.l0.k_proj is not adapted in this federation" in result.excluded["extra"]


def test_federation_keeps_the_previous_update_when_every_reply_is_hostile(gen):
    fed = Federation(
        FlexLoRAConfig(profile="homo", lora_alpha=8), module_infos({m[len("base_model.model.") :]: s for m, s in SHAPES.items()})
    )
    fed.assign_ranks("a", dict.fromkeys(SHAPES, 4))
    fed.aggregate({"a": Reply(_good(gen), 1)})
    before = fed.global_update
    hostile = {k: v * 1e20 for k, v in _good(gen).items()}
    result = fed.aggregate({"a": Reply(hostile, 1)})
    assert not result.updated and fed.global_update is before and "too large" in result.excluded["a"]


def test_a_reply_that_is_not_a_state_dict_is_excluded_not_a_crash(gen):
    fed = Federation(
        FlexLoRAConfig(profile="homo", lora_alpha=8), module_infos({m[len("base_model.model.") :]: s for m, s in SHAPES.items()})
    )
    for client in ("junk", "list", "good"):
        fed.assign_ranks(client, dict.fromkeys(SHAPES, 4))
    junk = {"base_model.model.l0.q_proj.lora_A.weight": "not a tensor"}
    result = fed.aggregate({"junk": Reply(junk, 1), "list": Reply([1, 2], 1), "good": Reply(_good(gen), 1)})
    assert result.kept == ["good"] and set(result.excluded) == {"junk", "list"}
