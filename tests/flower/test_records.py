"""records.py conversions and client sampling (no engine needed)."""

from __future__ import annotations

import json
import warnings

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord  # noqa: E402

from flexlora_plugin.flower import rank_label, sample_partitions  # noqa: E402
from flexlora_plugin.flower.records import (  # noqa: E402
    ARRAY_DTYPES,
    rank_info_record,
    read_rank_info,
    record_to_state,
    state_to_record,
)

pytestmark = pytest.mark.flower


def _state(dtype):
    g = torch.Generator().manual_seed(0)
    return {
        "base_model.model.layers.1.q_proj.lora_B.weight": torch.randn(6, 3, generator=g).to(dtype),
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(3, 5, generator=g).to(dtype),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(6, 3, generator=g).to(dtype).T.contiguous().T,
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_state_round_trip_is_exact(dtype):
    state = _state(dtype)
    arrays, note = state_to_record(state)
    assert isinstance(arrays, ArrayRecord) and isinstance(note, ConfigRecord)
    back = record_to_state(arrays, note)
    assert list(back) == list(state)  # keys and order preserved
    for key, value in state.items():
        assert back[key].dtype == dtype and back[key].shape == value.shape
        assert torch.equal(back[key].view(torch.uint8), value.contiguous().view(torch.uint8)), key  # bit-exact


def test_bf16_travels_as_int16_with_a_note():
    arrays, note = state_to_record(_state(torch.bfloat16))
    assert all(a.dtype == "int16" for a in arrays.values())
    assert "bfloat16" in str(note[ARRAY_DTYPES])
    with pytest.raises(ValueError, match="lacks"):
        record_to_state(ArrayRecord(), note)


def test_inputs_not_mutated_and_empty_round_trip():
    state = _state(torch.bfloat16)
    before = {k: v.clone() for k, v in state.items()}
    state_to_record(state)
    assert all(torch.equal(state[k], before[k]) and state[k].dtype == torch.bfloat16 for k in state)
    arrays, note = state_to_record({})
    assert record_to_state(arrays, note) == {}


def test_rank_info_round_trip_and_errors():
    ranks = {"model.layers.0.self_attn.q_proj": 8, "model.layers.0.mlp.down_proj": 30}
    shapes = {"model.layers.0.self_attn.q_proj": (576, 576), "model.layers.0.mlp.down_proj": (576, 1536)}
    assert read_rank_info(rank_info_record(5, ranks, shapes)) == (5, ranks, shapes)
    assert read_rank_info(rank_info_record(5)) == (5, None, None)  # the server draws the ranks, its model has the shapes
    assert read_rank_info(rank_info_record(5, shapes=shapes)) == (5, None, shapes)
    for bad in ({}, {"partition-id": "1"}, {"partition-id": True}):
        with pytest.raises(ValueError, match="partition-id"):
            read_rank_info(ConfigRecord(bad))
    good_shapes = '{"q_proj": [8, 8]}'
    with pytest.raises(ValueError, match="positive"):
        read_rank_info(ConfigRecord({"partition-id": 1, "rank-map": '{"q_proj": 0}', "module-shapes": good_shapes}))
    for bad in ('{"q_proj": [8]}', '{"q_proj": [8, -1]}', '{"q_proj": [8, true]}', "[]", "{"):
        with pytest.raises(ValueError, match="module-shapes"):
            read_rank_info(ConfigRecord({"partition-id": 1, "rank-map": '{"q_proj": 4}', "module-shapes": bad}))


def test_sampling_is_deterministic_and_order_free():
    ids = [7, 3, 0, 5, 1, 2, 6, 4]
    a = [sample_partitions(ids, 4, seed=0, server_round=r) for r in range(1, 6)]
    b = [sample_partitions(sorted(ids, reverse=True), 4, seed=0, server_round=r) for r in range(1, 6)]
    assert a == b  # same clients whatever the node order (and whatever the method)
    assert all(len(s) == 4 and s == sorted(s) and set(s) <= set(ids) for s in a)
    assert len({tuple(s) for s in a}) > 1  # rounds differ
    assert a != [sample_partitions(ids, 4, seed=1, server_round=r) for r in range(1, 6)]
    with pytest.raises(ValueError):
        sample_partitions(ids, 9, seed=0, server_round=1)


def test_rank_label():
    assert rank_label({"a": 8, "b": 8}) == "r8"
    assert rank_label({"a": 64, "b": 30, "c": 64}) == "r30-64"


@pytest.mark.parametrize(
    ("note", "match"),
    [
        ("[]", "must be a JSON object"),
        ("5", "must be a JSON object"),
        ('{"k": "load"}', "unsupported dtype 'load'"),
    ],
)
def test_a_hostile_dtype_note_is_a_value_error(note, match):
    arrays, _ = state_to_record({"k": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=match):
        record_to_state(arrays, ConfigRecord({ARRAY_DTYPES: note}))


def test_a_bf16_note_on_an_odd_width_int8_array_is_a_value_error():
    arrays, _ = state_to_record({"k": torch.zeros(2, 3, dtype=torch.int8)})
    with pytest.raises(ValueError, match="cannot be read as bfloat16"):
        record_to_state(arrays, ConfigRecord({ARRAY_DTYPES: '{"k": "bfloat16"}'}))


def test_a_sampled_partition_without_a_reply_is_reported_as_excluded():
    """A dead SuperNode sends nothing back (or a reply Flower cannot attribute): its partition is a
    failure with a reason, so metrics list it in excluded-partitions instead of silently dropping it."""
    from flexlora_plugin.flower.strategy import FlexLoRA

    strategy = FlexLoRA(lora_alpha=16.0)
    strategy.nodes.node_of = {0: 11, 1: 12}
    strategy._round.messages = [(object(), 0), (object(), 1), (object(), 5)]  # 5: served by a pool node
    decoded, failed = strategy._read_train_replies(3, [])
    assert decoded == {}
    assert failed == {
        0: "no reply this round (node 11 unavailable, or the round timed out)",
        1: "no reply this round (node 12 unavailable, or the round timed out)",
        5: "no reply this round (node of the pool unavailable, or the round timed out)",
    }


def test_fuzz_the_reply_parser_then_the_core():
    """Random arrays (any dtype, shape, key) with random dtype notes: the parser returns tensors or
    raises one of the errors the strategy turns into a 'malformed reply' exclusion; what it returns
    then meets the core, which excludes it with a reason or aggregates it. Never a raw exception."""
    pytest.importorskip("hypothesis", reason="pip install hypothesis (in the test extra)")
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from flexlora_plugin.core import FlexLoRAError, aggregate

    shapes = {"m.q_proj": (6, 4)}
    dtypes = [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int16,
        torch.int64,
        torch.bool,
        torch.uint8,
    ]
    keys = st.sampled_from(["m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight", "m.q_proj.weight", "x", ""])
    arrays = st.dictionaries(
        keys, st.tuples(st.sampled_from(dtypes), st.lists(st.integers(0, 7), min_size=0, max_size=3)), max_size=3
    )
    notes = st.one_of(
        st.none(),
        st.text(max_size=12),
        st.just("[]"),
        st.just("5"),
        st.just("null"),
        st.dictionaries(keys, st.sampled_from(["bfloat16", "float16", "load", "int16", "", "float32"]), max_size=2).map(
            json.dumps
        ),
    )

    @settings(max_examples=150, deadline=None)
    @given(spec=arrays, note=notes)
    def check(spec, note):
        state = {}
        for key, (dtype, shape) in spec.items():
            values = torch.rand(tuple(shape))
            state[key] = values > 0.5 if dtype == torch.bool else (values * 4 - 2).to(dtype)
        record, _ = state_to_record(state)  # bf16 travels as int16; the random note below decides how it is read
        config = ConfigRecord({ARRAY_DTYPES: note}) if note is not None else None
        try:
            parsed = record_to_state(record, config)
        except (KeyError, TypeError, ValueError):
            return  # the strategy's 'malformed reply' exclusion
        assert all(isinstance(v, torch.Tensor) for v in parsed.values())
        good = {"m.q_proj.lora_A.weight": torch.ones(2, 4), "m.q_proj.lora_B.weight": torch.ones(6, 2)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                update = aggregate(
                    {"fuzz": parsed, "good": good},
                    {"fuzz": 1.0, "good": 1.0},
                    lora_alpha=4.0,
                    on_invalid="exclude",
                    expected_shapes=shapes,
                )
            except FlexLoRAError:
                raise AssertionError("the good client was lost") from None
        assert "good" in update.clients and set(update.clients) | set(update.excluded) == {"fuzz", "good"}

    check()


def _train_round(monkeypatch, nodes: dict[int, int]):
    """A strategy that sent one train message per ``{partition: node}``, and those messages."""
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from flexlora_plugin.flower.records import CONFIG
    from flexlora_plugin.flower.strategy import FlexLoRA

    for name in ("run_id", "node_id", "task_id"):  # what a running ServerApp has; messages need it
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)
    sent = []
    for pid, node in nodes.items():
        msg = Message(RecordDict({CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node, message_type=MessageType.TRAIN)
        msg.metadata._message_id = f"m{pid}"  # the grid sets it when sending
        sent.append((msg, pid))
    strategy = FlexLoRA(lora_alpha=16.0)
    strategy.nodes.node_of = dict(nodes)
    strategy._round.messages = sent
    return strategy, [msg for msg, _ in sent]


def _train_reply(msg, damage=None):
    """A rank-2 reply to ``msg``; ``damage(bytes) -> bytes`` rewrites its lora_B array's npy bytes."""
    from flwr.app import Array, Message, MetricRecord, RecordDict

    from flexlora_plugin.flower.records import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES

    arrays, note = state_to_record({"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(4, 2)})
    if damage is not None:
        arrays["m.lora_B.weight"] = Array(
            dtype="float32", shape=(4, 2), stype="numpy.ndarray", data=damage(arrays["m.lora_B.weight"].data)
        )
    return Message(RecordDict({ARRAYS: arrays, CONFIG: note, METRICS: MetricRecord({NUM_EXAMPLES: 5})}), reply_to=msg)


def test_a_second_reply_for_one_partition_drops_both(monkeypatch):
    """Two replies for partition 0 in one round (a replayed or duplicated message): neither can be
    trusted, both are dropped with a reason naming the node; partition 1's single reply is kept."""
    strategy, (to0, to1) = _train_round(monkeypatch, {0: 7, 1: 8})
    decoded, failed = strategy._read_train_replies(2, [_train_reply(to0), _train_reply(to0), _train_reply(to1)])
    assert list(decoded) == [1]
    assert failed == {0: "two replies for partition 0 in one round (node 7 and another); both dropped"}


def test_record_to_state_matches_flowers_own_conversion_and_refuses_other_stypes():
    """The one-copy decoder (flexlora_plugin/flower/npy.py) against ArrayRecord.to_torch_state_dict."""
    from flwr.app import Array

    arrays, note = state_to_record({**_state(torch.float32), "x.lora_A.weight": torch.arange(6.0).reshape(2, 3).T})
    ours, flowers = record_to_state(arrays, note), arrays.to_torch_state_dict()
    assert list(ours) == list(flowers)
    assert all(torch.equal(ours[k], flowers[k]) and ours[k].dtype == flowers[k].dtype for k in ours)
    odd = ArrayRecord({"k": Array(dtype="float32", shape=(1,), stype="raw", data=b"\0\0\0\0")})
    with pytest.raises(TypeError, match="stype 'raw'"):
        record_to_state(odd)


def test_replies_with_truncated_or_oversized_arrays_are_excluded_as_malformed(monkeypatch):
    """A truncated payload, and a header claiming 10^12 floats: with Flower's own conversion the
    second raised MemoryError out of aggregate_train (np.load allocates before it reads), which
    ended the run; now both are malformed replies, excluded, and the honest one is kept."""

    def oversized(data: bytes) -> bytes:  # the header's text grows by 10 bytes into its padding: its length field holds
        head = data[: data.index(b"\n") + 1]
        grown = head.replace(b"'shape': (4, 2), ", b"'shape': (1000000000000,), ").replace(b" " * 10 + b"\n", b"\n")
        assert len(grown) == len(head)
        return grown + data[len(head) :]

    strategy, (to0, to1, to2) = _train_round(monkeypatch, {0: 7, 1: 8, 2: 9})
    replies = [_train_reply(to0, lambda d: d[:-8]), _train_reply(to1, oversized), _train_reply(to2, lambda d: d)]
    decoded, failed = strategy._read_train_replies(2, replies)
    assert list(decoded) == [2] and torch.equal(decoded[2].state["m.lora_B.weight"], torch.ones(4, 2))
    assert sorted(failed) == [0, 1] and all(reason.startswith("malformed reply: ValueError") for reason in failed.values())
    assert "needs 32" in failed[0] and "needs 4000000000000" in failed[1]
