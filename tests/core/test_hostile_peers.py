"""Hostile peers, second pass: every class of input from docs/reliability.md's "hostile peers" rows.

Each input is an exclusion with a reason or a :class:`FlexLoRAError` naming the problem; honest
clients' results stay exact (float64 references written here from the equation); nothing hangs,
blows up memory, or carries a bad update into the next round. Tests marked ``hostile`` run under
a per-test timeout and memory limit (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from flexlora_plugin.core import (
    FlexLoRAConfig,
    FlexLoRAError,
    RankError,
    ShapeMismatchError,
    aggregate,
    load_server_state,
    module_infos,
    register_method,
    save_server_state,
)
from flexlora_plugin.core.federation import Federation, Reply
from flexlora_plugin.core.methods.fedavg import FedAvgUpdate
from tests.conftest import make_client, ref_delta

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}
PREFIX = "base_model.model."
ALPHA = 16.0


def _fed(tmp_path=None, info=None, **config) -> Federation:
    cfg = FlexLoRAConfig(**{"lora_alpha": ALPHA, "profile": "homo", **config})
    path = None if tmp_path is None else tmp_path / "s.safetensors"
    return Federation(cfg, info or module_infos(SHAPES), shapes=SHAPES, state_path=path)


def _state(r: int, gen: torch.Generator, dtype=torch.float32, adapter=None) -> dict[str, torch.Tensor]:
    return make_client(
        {PREFIX + m: r for m in SHAPES}, {PREFIX + m: s for m, s in SHAPES.items()}, gen=gen, dtype=dtype, adapter=adapter
    )


def _exact(update, states: list[dict], weights: list[float]) -> None:
    """The update's ΔW is the float64 reference over exactly these (honest) states."""
    for m in SHAPES:
        ref = ref_delta(states, weights, PREFIX + m, [ALPHA] * len(states))
        got = update.delta(PREFIX + m).double()
        assert float((got - ref).norm() / ref.norm()) < 1e-5, m


# ---------------------------------------------------------------- one reply decides for everyone
@pytest.mark.parametrize("hostile_first", [True, False])
def test_a_float16_reply_does_not_set_the_dtype_honest_clients_receive(gen, hostile_first):
    fed = _fed()
    for c in ("h1", "h2", "evil"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    honest = [_state(4, gen), _state(4, gen)]
    evil = {k: (v * 300).to(torch.float16) for k, v in _state(4, gen).items()}  # finite in float16
    replies = {"h1": Reply(honest[0], 10), "h2": Reply(honest[1], 10)}
    replies = {"evil": Reply(evil, 10), **replies} if hostile_first else {**replies, "evil": Reply(evil, 10)}
    result = fed.aggregate(replies)
    assert result.updated and result.error is None
    for c in ("h1", "h2"):
        sent = fed.factors_for(c)
        assert {t.dtype for t in sent.values()} == {torch.float32}, c
        assert all(bool(torch.isfinite(t).all()) for t in sent.values())


def test_a_reply_with_an_adapter_name_does_not_set_the_keys_others_receive(gen):
    fed = _fed()
    for c in ("evil", "h1"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    evil = _state(4, gen, adapter="evil")  # lora_A.evil.weight: a valid key format, another adapter name
    fed.aggregate({"evil": Reply(evil, 10), "h1": Reply(_state(4, gen), 10)})
    assert set(fed.factors_for("h1")) == {f"{PREFIX}{m}.lora_{f}.weight" for m in SHAPES for f in "AB"}


@pytest.mark.parametrize("order", ["hostile first", "hostile last"])
def test_aggregate_without_a_reference_refuses_disagreeing_replies_or_takes_an_explicit_count_majority(gen, order):
    shapes = {PREFIX + m: s for m, s in SHAPES.items()}
    honest = [make_client(dict.fromkeys(shapes, 4), shapes, gen=gen) for _ in range(3)]
    other = {k: (v, s) for k, v, s in []}
    other = make_client(dict.fromkeys(shapes, 4), {m: (d_out + 1, d_in) for m, (d_out, d_in) in shapes.items()}, gen=gen)
    states = [other, *honest] if order == "hostile first" else [*honest, other]
    ids = ["evil", "a", "b", "c"] if order == "hostile first" else ["a", "b", "c", "evil"]
    with pytest.raises(ShapeMismatchError, match=r"the replies disagree on its shape .* no reference was given"):
        aggregate(dict(zip(ids, states)), dict.fromkeys(ids, 1.0), lora_alpha=ALPHA, on_invalid="exclude")
    with pytest.warns(Warning, match="client evil excluded"):
        update = aggregate(
            dict(zip(ids, states)), dict.fromkeys(ids, 1.0), lora_alpha=ALPHA, on_invalid="exclude", shape_majority=True
        )
    assert set(update.clients) == {"a", "b", "c"} and "of the majority of replies" in update.excluded["evil"]
    _exact(update, honest, [1.0, 1.0, 1.0])
    with pytest.raises(ShapeMismatchError, match="disagree"):  # 1 against 1: no strict majority
        aggregate({"a": honest[0], "evil": other}, {"a": 1.0, "evil": 1e9}, lora_alpha=ALPHA, shape_majority=True)


def test_without_a_reference_the_dtype_is_the_widest_and_keys_fall_back_to_peft(gen):
    shapes = {PREFIX + m: s for m, s in SHAPES.items()}
    low = {k: v.to(torch.float16) for k, v in make_client(dict.fromkeys(shapes, 4), shapes, gen=gen).items()}
    named = make_client(dict.fromkeys(shapes, 4), shapes, gen=gen, adapter="x")
    update = aggregate([low, named], [1, 1], lora_alpha=ALPHA)
    for m in shapes:
        assert update.info[m].dtype == torch.float32 and update.info[m].a_key == f"{m}.lora_A.weight"


# ---------------------------------------------------------------- checked in one dtype, computed in another
def test_a_float64_reply_too_large_for_float32_is_excluded_and_the_next_round_runs(gen):
    fed = _fed()
    for c in ("h1", "h2", "evil"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    evil = {k: v.double() * (1e30 if ".lora_A." in k else 1e-30) for k, v in _state(4, gen).items()}  # small as a product
    honest = [_state(4, gen), _state(4, gen)]
    result = fed.aggregate({"h1": Reply(honest[0], 3), "evil": Reply(evil, 3), "h2": Reply(honest[1], 5)})
    assert result.updated and result.kept == ["h1", "h2"]
    assert "factor too large to aggregate in float32" in result.excluded["evil"]
    _exact(fed.global_update, honest, [3, 5])
    again = [_state(4, gen), _state(4, gen)]
    assert fed.aggregate({"h1": Reply(again[0], 1), "h2": Reply(again[1], 1)}).updated
    _exact(fed.global_update, again, [1, 1])


class _Failing(FedAvgUpdate):
    """FedAvg whose linear algebra fails while ``fail`` is set: a round that cannot be formed."""

    fail = True

    @classmethod
    def from_round(cls, rnd):
        if cls.fail:
            raise torch.linalg.LinAlgError("linalg.svd: the algorithm failed to converge")
        return super().from_round(rnd)


register_method("test-failing")(_Failing)


def test_a_linear_algebra_failure_keeps_the_previous_update_and_the_federation_usable(tmp_path, gen):
    fed = _fed(tmp_path, method="test-failing")
    for c in ("a", "b"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    first = [_state(4, gen), _state(4, gen)]
    _Failing.fail = False
    assert fed.aggregate({"a": Reply(first[0], 1), "b": Reply(first[1], 1)}).updated
    before = fed.global_update
    try:
        _Failing.fail = True
        result = fed.aggregate({"a": Reply(_state(4, gen), 1), "b": Reply(_state(4, gen), 1)})
    finally:
        _Failing.fail = False
    assert not result.updated and result.kept == [] and fed.global_update is before
    assert result.error == "LinAlgError: linalg.svd: the algorithm failed to converge"
    assert fed.history[-1]["round-failed"] == result.error and fed.failures == {"a": 0, "b": 0}
    assert load_server_state(tmp_path / "s.safetensors").round == 2  # the state was saved with the previous update
    assert fed.aggregate({"a": Reply(first[0], 1), "b": Reply(first[1], 1)}).updated and fed.round == 3


def test_an_update_that_overflows_the_dtype_clients_receive_is_not_swapped_in(gen):
    fed = _fed(info=module_infos(SHAPES, dtype=torch.float16))  # the federation's adapters are float16
    for c in ("a", "b"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    assert fed.aggregate({c: Reply(_state(4, gen), 1) for c in ("a", "b")}).updated
    before = fed.global_update
    big = {c: Reply({k: v * 3e3 for k, v in _state(4, gen).items()}, 1) for c in ("a", "b")}  # ‖s·B·A‖ ≫ 65504
    result = fed.aggregate(big)
    assert not result.updated and fed.global_update is before
    assert result.error.startswith("ArithmeticError: round 2: the new update does not fit the dtype clients receive")


# ---------------------------------------------------------------- peers' numbers unbounded
@pytest.mark.parametrize("n", [10**400, -(10**400), float("inf"), 2**53 + 2, "12", None, [3]])
def test_example_counts_out_of_bounds_are_exclusions(gen, n):
    fed = _fed()
    for c in ("h", "evil"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    honest = _state(4, gen)
    result = fed.aggregate({"h": Reply(honest, 7), "evil": Reply(_state(4, gen), n)})
    assert result.kept == ["h"] and "num-examples must be a positive finite number, at most 2**53" in result.excluded["evil"]
    _exact(fed.global_update, [honest], [1.0])


def test_aggregate_refuses_a_weight_beyond_the_float_range_by_name(gen):
    with pytest.raises(ValueError, match=r"client 0: weight must be a positive finite number, got 1000000000"):
        aggregate([_state(4, gen), _state(4, gen)], [10**400, 1], lora_alpha=ALPHA)


@pytest.mark.parametrize("method", ["flexlora", "fedavg", "hetlora"])
def test_weights_whose_sum_underflows_normalise_without_dividing_by_zero(gen, method):
    """A module held only by clients of tiny weight: its p_k are still well defined (divided by the largest first)."""
    q, down = (PREFIX + m for m in SHAPES)
    shapes = {PREFIX + m: s for m, s in SHAPES.items()}
    tiny = make_client({q: 4}, shapes, gen=gen)  # holds q only
    big = make_client({down: 4}, shapes, gen=gen)  # holds down only
    weights = [5e-324, 1e300]
    update = aggregate([tiny, big], weights, lora_alpha=ALPHA, method=method)
    assert torch.isfinite(update.delta(q)).all() and torch.isfinite(update.delta(down)).all()
    ref = ref_delta([tiny], [1.0], q, [ALPHA])
    assert float((update.delta(q).double() - ref).norm() / ref.norm()) < 1e-5


# ---------------------------------------------------------------- peers' rank maps are data
@pytest.mark.hostile(timeout=10, memory=1 << 30)
@pytest.mark.parametrize(
    ("ranks", "match"),
    [
        ({"(": 4}, r"1 rank map entries name no adapted module .*'\('"),
        ({"(a+)+$": 4}, r"name no adapted module .*'\(a\+\)\+\$'"),  # nested quantifiers: never run as a regex
        ({"(.*)*" + "a" * 30 + "!": 4, **dict.fromkeys(SHAPES, 4)}, "name no adapted module"),
        ({f"model.layers.{i}.mlp.x": 4 for i in range(100_000)}, r"100000 rank map entries name no adapted module"),
        ({"q_proj": 4, "down_proj": 4}, "name no adapted module"),  # suffixes are an operator's shorthand, not a peer's
        ({m: 4 for m in list(SHAPES)[:1]}, "no rank for module model.layers.0.mlp.down_proj"),
    ],
)
def test_a_reported_rank_map_names_modules_exactly_and_is_never_compiled(ranks, match):
    fed = _fed()
    with pytest.raises(RankError, match=match):
        fed.assign_ranks("evil", ranks)
    assert "evil" not in fed.rank_maps


@pytest.mark.hostile(timeout=20, memory=1 << 30)
def test_resolving_a_peer_map_is_linear_in_its_size():
    """O(N + M): 100x the entries costs about 100x, not 100x times the modules (no pattern per key and module)."""
    many = {f"model.layers.{i}.self_attn.q_proj": (8, 8) for i in range(2000)}
    fed = Federation(FlexLoRAConfig(lora_alpha=ALPHA, profile="homo"), module_infos(many), shapes=many)

    def cost(n_extra: int) -> float:
        ranks = {**dict.fromkeys(many, 2), **{f"x{i}": 2 for i in range(n_extra)}}
        start = time.perf_counter()
        with pytest.raises(RankError):
            fed.assign_ranks("evil", ranks)
        return time.perf_counter() - start

    fed.assign_ranks("ok", dict.fromkeys(many, 2))  # 2,000 modules, exact: a dictionary pass
    assert fed.rank_for("ok") == dict.fromkeys(many, 2)
    small, large = min(cost(1_000) for _ in range(3)), min(cost(100_000) for _ in range(3))
    assert large < 0.5, f"100,000 unknown keys took {large:.2f} s"  # a pattern per key × module took minutes
    assert large / max(small, 1e-4) < 400, (small, large)


# ---------------------------------------------------------------- the state file of another model
def test_a_state_of_another_model_is_refused_on_restore(tmp_path, gen):
    fed = _fed(tmp_path)
    for c in ("a", "b"):
        fed.assign_ranks(c, dict.fromkeys(SHAPES, 4))
    fed.aggregate({c: Reply(_state(4, gen), 1) for c in ("a", "b")})
    other_shapes = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 41)}
    other = Federation(FlexLoRAConfig(lora_alpha=ALPHA, profile="homo"), module_infos(other_shapes), shapes=other_shapes)
    with pytest.raises(FlexLoRAError, match=r"is a state of another model: module .*down_proj is \(16, 40\), here \(16, 41\)"):
        other.restore(tmp_path / "s.safetensors")
    fewer = {"model.layers.0.self_attn.q_proj": (24, 16)}
    one = Federation(FlexLoRAConfig(lora_alpha=ALPHA, profile="homo"), module_infos(fewer), shapes=fewer)
    with pytest.raises(FlexLoRAError, match=r"is a state of another model: 1 module\(s\) not in this federation .*down_proj"):
        one.restore(tmp_path / "s.safetensors")
    same = _fed()
    assert same.restore(tmp_path / "s.safetensors") == 1


hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@pytest.mark.hostile(timeout=120, memory=1 << 30)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.lists(
        st.sampled_from(["round", "seed", "method", "clients", "modules", "extra", "format", "sha256", "*"]),
        min_size=1,
        max_size=3,
    ),
    value=_JSON,
)
def test_fuzzed_state_metadata_is_a_flexlora_error_or_a_valid_state(tmp_path_factory, path, value):
    """Any field replaced by any JSON value (checksum recomputed, as only a deliberate rewrite does): a FlexLoRAError or a state that loads consistently."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("fuzz")
    gen = torch.Generator().manual_seed(0)
    states = [_state(4, gen) for _ in range(2)]
    file = save_server_state(folder / "s.safetensors", aggregate(states, [1, 1], lora_alpha=ALPHA), round=2, seed=0)
    with safe_open(str(file), framework="pt") as f:
        meta = json.loads(f.metadata()["flexlora"])
    node = meta
    for key in path[:-1]:  # walk down to the field to replace ("*": the first entry of an object)
        if not isinstance(node, dict) or not node:
            break
        key = next(iter(node)) if key == "*" else key
        if not isinstance(node.get(key), dict):
            break
        node = node[key]
    last = next(iter(node)) if path[-1] == "*" and node else path[-1]
    node[last] = value
    text = json.dumps(meta)
    save_file(
        load_file(str(file)), str(file), metadata={"flexlora": text, "flexlora-sha256": hashlib.sha256(text.encode()).hexdigest()}
    )
    try:
        state = load_server_state(file, reference={PREFIX + m: i for m, i in zip(SHAPES, module_infos(SHAPES).values())})
    except FlexLoRAError:
        return
    assert isinstance(state.round, int) and isinstance(state.seed, int) and isinstance(state.extra, dict)
    if state.update is not None:
        for t in state.update.project(4, lora_alpha=ALPHA).values():
            assert torch.isfinite(t).all() and not math.isnan(float(t.sum()))
