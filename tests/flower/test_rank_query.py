"""The strategy's rank query against hostile nodes: each node is refused alone, the others carry on.

Replies are real Flower ``Message`` objects, each with the node id a SuperLink would stamp on it,
handed to :meth:`FlexLoRA.query_nodes` by :class:`Replayed`, a ``Grid`` that returns prepared
replies (the transport itself runs for real in tests/flower/test_simulation.py and
test_deployment.py; here each reply is chosen). Hostile-input tests run under a per-test timeout
and memory limit (tests/conftest.py); the hypothesis fuzz runs derandomised in CI.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict  # noqa: E402
from flwr.app.metadata import Metadata  # noqa: E402
from flwr.serverapp.grid import Grid  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from flexlora_plugin.core import FlexLoRAConfig  # noqa: E402
from flexlora_plugin.flower import FlexLoRA  # noqa: E402
from flexlora_plugin.flower.records import (  # noqa: E402
    MODULE_SHAPES,
    NUM_PARTITIONS,
    PARTITION_ID,
    RANK_INFO,
    RANK_MAP,
    pool_info_record,
    rank_info_record,
)

pytestmark = pytest.mark.flower

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.mlp.down_proj": (16, 40)}
OTHER = {**SHAPES, "model.layers.0.mlp.down_proj": (16, 41)}


class Replayed(Grid):
    """A ``Grid`` whose nodes answer with prepared replies, in the order given (the order a SuperLink delivers)."""

    def __init__(self, replies: list[Message]) -> None:
        self.replies = replies

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def push_messages(self, messages):
        return [str(i) for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        return list(self.replies)

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


@pytest.fixture(autouse=True)
def _server_identity():
    """What a ServerApp process has set when the strategy builds its query messages."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _reply(nid: int, record: ConfigRecord) -> Message:
    meta = Metadata(
        run_id=1,
        message_id=f"m{nid}",
        src_node_id=nid,
        dst_node_id=0,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type="query.rank",
    )
    return Message(content=RecordDict({RANK_INFO: record}), metadata=meta)


def _node(nid: int, pid: int, r: int = 4, shapes=SHAPES, ranks=None) -> Message:
    return _reply(nid, rank_info_record(pid, ranks if ranks is not None else dict.fromkeys(shapes, r), shapes))


def _strategy(**kwargs) -> FlexLoRA:
    return FlexLoRA(FlexLoRAConfig(lora_alpha=16.0, profile="uniform"), **kwargs)


@pytest.mark.parametrize("reference", [True, False])
def test_a_node_with_other_shapes_is_refused_alone_even_when_it_answers_first(reference, caplog):
    strategy = _strategy(module_shapes=SHAPES if reference else None)
    maps = strategy.query_nodes(Replayed([_node(9, 2, shapes=OTHER), _node(1, 0), _node(2, 1, r=8)]))
    assert maps == {0: dict.fromkeys(SHAPES, 4), 1: dict.fromkeys(SHAPES, 8)}
    assert strategy.shapes == SHAPES and strategy.node_of == {0: 1, 1: 2}
    assert "node 9 (partition 2) refused: other module shapes than" in caplog.text


def test_without_a_reference_or_a_majority_the_query_fails_with_every_reason():
    with pytest.raises(TimeoutError, match="0 of 2 nodes answered usably .*no majority exists: pass module_shapes"):
        _strategy().query_nodes(Replayed([_node(9, 1, shapes=OTHER), _node(1, 0)]))


def test_a_partition_claimed_twice_goes_to_the_first_node_with_a_valid_map():
    bad_map = _node(7, 0, ranks={"(": 4})  # never compiled; refused before it claims anything
    strategy = _strategy(module_shapes=SHAPES)
    maps = strategy.query_nodes(Replayed([bad_map, _node(1, 0), _node(2, 0, r=8), _node(3, 1)]))
    assert maps == {0: dict.fromkeys(SHAPES, 4), 1: dict.fromkeys(SHAPES, 4)} and strategy.node_of == {0: 1, 1: 3}


@pytest.mark.hostile(timeout=20, memory=1 << 30)
@pytest.mark.parametrize(
    "record",
    [
        pool_info_record(10**9, SHAPES),  # a 150-byte message asking for a billion rank draws
        ConfigRecord({PARTITION_ID: 10**9, RANK_MAP: json.dumps(dict.fromkeys(SHAPES, 4)), MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord({PARTITION_ID: -3, RANK_MAP: json.dumps(dict.fromkeys(SHAPES, 4)), MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord({PARTITION_ID: 1, RANK_MAP: json.dumps({"(a+)+$": 4}), MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord(
            {PARTITION_ID: 1, RANK_MAP: json.dumps({f"m{i}": 4 for i in range(100_000)}), MODULE_SHAPES: json.dumps(SHAPES)}
        ),
        ConfigRecord({PARTITION_ID: 1, RANK_MAP: "[" * 100_000, MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord({PARTITION_ID: 1, RANK_MAP: " " * (1 << 23), MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord({PARTITION_ID: 1, RANK_MAP: json.dumps(dict.fromkeys(SHAPES, 10**9)), MODULE_SHAPES: json.dumps(SHAPES)}),
        ConfigRecord({PARTITION_ID: "x", NUM_PARTITIONS: 3}),
        ConfigRecord({PARTITION_ID: 1, RANK_MAP: json.dumps({"q": 4}), MODULE_SHAPES: json.dumps({"m": [2**40, 2]})}),
    ],
)
def test_out_of_bounds_or_malformed_answers_are_refused_alone_without_a_hang_or_a_blow_up(record, caplog):
    strategy = _strategy(module_shapes=SHAPES)
    maps = strategy.query_nodes(Replayed([_reply(5, record), _node(1, 0)]))
    assert maps == {0: dict.fromkeys(SHAPES, 4)} and strategy.pool_nodes == [] and len(strategy.rank_maps) == 1
    assert "node 5" in caplog.text and "refused" in caplog.text


def test_pool_nodes_within_the_bound_serve_the_unclaimed_partitions():
    strategy = _strategy(module_shapes=SHAPES, max_partitions=6)
    maps = strategy.query_nodes(Replayed([_reply(4, pool_info_record(6, SHAPES)), _node(1, 0)]))
    assert sorted(maps) == list(range(6)) and strategy.pool_nodes == [4] and strategy.node_of == {0: 1}
    with pytest.raises(ValueError, match="max_partitions must be a positive int"):
        _strategy(max_partitions=0)


hypothesis = pytest.importorskip("hypothesis", reason="pip install hypothesis (in the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SCALAR = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
_JSON_TEXT = st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.sampled_from([*SHAPES, "q_proj", "(", ".*", "x"]), _SCALAR, max_size=4).map(json.dumps),
    st.dictionaries(
        st.sampled_from([*SHAPES, "z"]), st.lists(st.integers(-3, 2**41) | st.booleans(), max_size=3), max_size=3
    ).map(json.dumps),
    st.just(json.dumps(SHAPES)),
    st.just(json.dumps(dict.fromkeys(SHAPES, 4))),
)
_VALUE = st.one_of(_SCALAR.filter(lambda v: v is not None), _JSON_TEXT)
_RECORD = st.dictionaries(
    st.sampled_from([PARTITION_ID, RANK_MAP, MODULE_SHAPES, NUM_PARTITIONS, "other"]),
    st.one_of(st.integers(-5, 2**40), _JSON_TEXT, st.just("any"), st.floats(allow_nan=False, allow_infinity=False)),
    max_size=5,
)


@pytest.mark.hostile(timeout=180, memory=1 << 30)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(hostile=st.lists(_RECORD, min_size=1, max_size=4), reference=st.booleans())
def test_fuzzed_rank_answers_never_stop_the_query_for_the_honest_node(hostile, reference):
    """Any answers from other nodes: the honest node (answering first) keeps its partition, nothing raises but refusals."""
    records = []
    for fields in hostile:
        try:
            records.append(ConfigRecord(fields))
        except (TypeError, ValueError):  # Flower itself refuses to build this record: no node can send it
            continue
    strategy = _strategy(module_shapes=SHAPES if reference else None, max_partitions=64)
    replies = [_node(1, 0, r=4), *(_reply(10 + i, r) for i, r in enumerate(records))]
    if not reference:
        replies += [_node(2, 1), _node(3, 2)]  # a majority of honest nodes when there is no reference
    maps = strategy.query_nodes(Replayed(replies))
    assert maps[0] == dict.fromkeys(SHAPES, 4) and strategy.node_of[0] == 1 and strategy.shapes == SHAPES
    assert len(maps) <= 64
