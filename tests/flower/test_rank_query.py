"""The strategy against a replayed grid: the rank query (each hostile node refused alone, the
others carry on) and ``FedAvg``'s settings, honoured or refused in one line.

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
    assert strategy.shapes == SHAPES and strategy.nodes.node_of == {0: 1, 1: 2}
    assert "node 9 (partition 2) refused: other module shapes than" in caplog.text


def test_without_a_reference_or_a_majority_the_query_fails_with_every_reason():
    with pytest.raises(TimeoutError, match="0 of 2 nodes answered usably .*no majority exists: pass module_shapes"):
        _strategy().query_nodes(Replayed([_node(9, 1, shapes=OTHER), _node(1, 0)]))


def test_a_partition_claimed_twice_goes_to_the_first_node_with_a_valid_map():
    bad_map = _node(7, 0, ranks={"(": 4})  # never compiled; refused before it claims anything
    strategy = _strategy(module_shapes=SHAPES)
    maps = strategy.query_nodes(Replayed([bad_map, _node(1, 0), _node(2, 0, r=8), _node(3, 1)]))
    assert maps == {0: dict.fromkeys(SHAPES, 4), 1: dict.fromkeys(SHAPES, 4)} and strategy.nodes.node_of == {0: 1, 1: 3}


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
    assert maps == {0: dict.fromkeys(SHAPES, 4)} and strategy.nodes.pool == [] and len(strategy.rank_maps) == 1
    assert "node 5" in caplog.text and "refused" in caplog.text


def test_pool_nodes_within_the_bound_serve_the_unclaimed_partitions():
    strategy = _strategy(module_shapes=SHAPES, max_partitions=6)
    maps = strategy.query_nodes(Replayed([_reply(4, pool_info_record(6, SHAPES)), _node(1, 0)]))
    assert sorted(maps) == list(range(6)) and strategy.nodes.pool == [4] and strategy.nodes.node_of == {0: 1}
    with pytest.raises(ValueError, match="max_partitions must be a positive int"):
        _strategy(max_partitions=0)


def test_a_node_sending_only_its_partition_gets_the_profiles_draw_on_the_servers_shapes():
    """What a FlowerTune-style ClientApp answers: no rank map, no shapes; the server's model decides both."""
    from flexlora_plugin.core import sample_ranks

    strategy = _strategy(module_shapes=SHAPES, seed=3)
    maps = strategy.query_nodes(Replayed([_reply(1, rank_info_record(0)), _reply(2, rank_info_record(5))]))
    sampler = strategy.config.sampler()
    assert maps == {p: sample_ranks(sampler, p, strategy.config.seed, shapes=SHAPES) for p in (0, 5)}
    assert strategy.nodes.node_of == {0: 1, 5: 2}
    with pytest.raises(TimeoutError, match="pass module_shapes"):  # without the model's shapes nobody is usable
        _strategy().query_nodes(Replayed([_reply(1, rank_info_record(0))]))


def _replies_to(messages, make):
    """Replies (as a SuperNode stamps them) to ``messages``, each with ``make(partition, message) -> RecordDict``."""
    out = []
    for i, msg in enumerate(messages):
        msg.metadata._message_id = f"m{i}"  # the grid sets it when sending
        pid = int(msg.content.config_records[next(iter(msg.content.config_records))][PARTITION_ID])
        out.append(Message(make(pid, msg), reply_to=msg))
    return out


def test_fedavgs_record_keys_and_weight_key_are_honoured():
    """arrayrecord_key, configrecord_key and weighted_by_key name what travels both ways; a reply
    without the weight key is excluded as malformed; train_metrics_aggr_fn's record joins the round's."""
    from flwr.app import ArrayRecord, MetricRecord

    from flexlora_plugin.flower.records import record_to_state, state_to_record

    seen = []

    def aggr(contents, key):
        seen.append(key)
        return MetricRecord({"replies-merged": len(contents)})

    records = []
    strategy = _strategy(
        module_shapes=SHAPES,
        arrayrecord_key="lora",
        configrecord_key="cfg",
        weighted_by_key="n",
        train_metrics_aggr_fn=aggr,
        on_round=records.append,
    )
    strategy.query_nodes(Replayed([_node(1, 0), _node(2, 1, r=8)]))
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({"lr": 0.1}), Replayed([])))
    assert [sorted(m.content.keys()) for m in messages] == [["cfg", "lora"], ["cfg", "lora"]]
    assert all(m.content["cfg"]["lr"] == 0.1 for m in messages)

    def reply(pid, msg):
        state = record_to_state(msg.content["lora"], msg.content["cfg"])
        weight = {"n": 3} if pid == 0 else {"num-examples": 3}  # partition 1 names FedAvg's default key: not ours
        return RecordDict({"lora": state_to_record(state)[0], "metrics": MetricRecord({**weight, "train_loss": 0.5})})

    arrays, metrics = strategy.aggregate_train(1, _replies_to(messages, reply))
    assert records[0].result.kept == [0] and "malformed reply" in records[0].result.excluded[1]
    assert records[0].replies[0].num_examples == 3 and records[0].replies[0].train_loss == 0.5
    assert metrics["replies-merged"] == 1 and seen == ["n"] and metrics["clients-ok"] == 1
    assert sorted(arrays.keys()) == sorted(strategy.global_arrays().keys())  # the global adapter, peft keys
    assert all(k.startswith("base_model.model.model.layers.0.") for k in arrays.keys())


def test_fraction_and_min_train_nodes_size_the_sample_and_bad_settings_fail_in_one_line():
    strategy = _strategy(module_shapes=SHAPES, fraction_train=0.25, min_train_nodes=3)
    strategy.query_nodes(Replayed([_node(n, n - 1) for n in range(1, 9)]))
    assert len(strategy.sampled_partitions(1)) == 3  # max(int(0.25 * 8), 3)
    half = _strategy(module_shapes=SHAPES, fraction_train=0.5, min_train_nodes=1)
    half.query_nodes(Replayed([_node(n, n - 1) for n in range(1, 9)]))
    assert len(half.sampled_partitions(1)) == 4  # int(0.5 * 8)
    for bad, match in (
        ({"fraction_train": 0.0}, "fraction_train must be in"),
        ({"min_available_nodes": 0}, "min_available_nodes must be"),
        ({"clients_per_round": 0}, "clients_per_round must be"),
    ):
        with pytest.raises(ValueError, match=match):
            _strategy(**bad)


def test_a_trained_initial_adapter_is_refused_an_untrained_one_is_the_common_start():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    zero_b = {
        "base_model.model.m.lora_A.weight": np.ones((2, 3), np.float32),
        "base_model.model.m.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    trained = {**zero_b, "base_model.model.m.lora_B.weight": np.full((4, 2), 0.1, np.float32)}
    strategy = _strategy(module_shapes=SHAPES)
    with pytest.raises(ValueError, match="initial_arrays holds a trained adapter"):
        strategy.start(Replayed([]), ArrayRecord({k: Array(v) for k, v in trained.items()}), num_rounds=1)
    assert strategy.federation is None  # refused before the rank query
    from flexlora_plugin.flower.strategy import _check_initial

    _check_initial(ArrayRecord({k: Array(v) for k, v in zero_b.items()}))  # no error: peft's fresh adapter


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
    assert maps[0] == dict.fromkeys(SHAPES, 4) and strategy.nodes.node_of[0] == 1 and strategy.shapes == SHAPES
    assert len(maps) <= 64
