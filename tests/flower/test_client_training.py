"""The Flower host's local training (``flexlora_app.task``) on the tiny model: device, dtype, cache, FedProx."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flexlora_plugin.core import initial_update, module_infos

APP = Path(__file__).resolve().parents[2] / "flower_app"


@pytest.fixture(scope="module")
def task():
    pytest.importorskip("flwr")  # the App's task module holds its FlexLoRAClient
    sys.path.insert(0, str(APP))
    try:
        import flexlora_app.task as task
    finally:
        sys.path.remove(str(APP))
    return task


def _run_config(tiny_model, data_path, tmp_path) -> dict:
    """The App's run config (its pyproject.toml defaults) on the tiny model, sized for a test."""
    import tomllib

    config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config.update(
        {
            "model-path": str(tiny_model),
            "data-path": str(data_path),
            "output-dir": str(tmp_path),
            "local-steps": 3,
            "batch-size": 2,
            "max-train-examples": 8,
            "lr": 0.01,
        }
    )
    return config


def _settings(task, tiny_model, data_path, tmp_path, **overrides):
    settings = task.Settings.from_context(_run_config(tiny_model, data_path, tmp_path), run_id=0)
    return replace(settings, **overrides)


def _round1(task, settings, pid):
    ranks = task.node_rank_map(settings, {}, pid)
    cm, _ = task.client_model(settings)
    received = initial_update(module_infos(cm.shapes), [ranks], seed=settings.seed).project(ranks, lora_alpha=settings.lora_alpha)
    return ranks, received


def _moved(state, received):
    return sum(float((state[k] - v).pow(2).sum()) for k, v in received.items()) ** 0.5


@pytest.mark.slow
def test_large_proximal_mu_shrinks_the_update(task, tiny_model, data_path, tmp_path):
    free = _settings(task, tiny_model, data_path, tmp_path)
    ranks, received = _round1(task, free, 0)
    state, n, loss = task.train_partition(free, 0, ranks, received, server_round=1)
    prox = replace(free, proximal_mu=1e4)
    held, _, _ = task.train_partition(prox, 0, ranks, received, server_round=1)
    assert n > 0 and loss > 0
    assert _moved(held, received) < 0.5 * _moved(state, received), (_moved(held, received), _moved(state, received))
    with pytest.raises(ValueError, match="proximal-mu"):
        replace(free, proximal_mu=-1.0)


@pytest.mark.slow
def test_one_base_per_process_and_bf16_training(task, tiny_model, data_path, tmp_path):
    settings = _settings(task, tiny_model, data_path, tmp_path, dtype="bfloat16")
    for pid in (0, 1, 2):
        ranks, received = _round1(task, settings, pid)
        state, _, loss = task.train_partition(settings, pid, ranks, received, server_round=1)
        assert torch.isfinite(torch.tensor(loss)) and {v.dtype for v in state.values()} == {torch.float32}
        assert set(state) == set(received) and all(state[k].shape == v.shape for k, v in received.items())
        assert any(state[k].abs().sum() > 0 for k in state if ".lora_B." in k)  # trained: B left zero
    cm, _ = task.client_model(settings)
    assert cm.dtype == torch.bfloat16 and cm.device == torch.device("cpu")
    assert len([k for k in task._CLIENT if k[2] == "bfloat16"]) == 1  # one base for every partition
    with pytest.raises(ValueError, match="dtype must be one of"):
        replace(settings, dtype="int4")
    for bad in ("tpu", "cuda:x"):
        with pytest.raises(ValueError, match="device must be"):
            replace(settings, device=bad)


@pytest.mark.slow
def test_same_inputs_same_update(task, tiny_model, data_path, tmp_path):
    """No hidden per-round state: the cached model gives the same reply to the same message."""
    settings = _settings(task, tiny_model, data_path, tmp_path)
    ranks, received = _round1(task, settings, 3)
    first, _, _ = task.train_partition(settings, 3, ranks, received, server_round=2)
    task.train_partition(settings, 4, *_round1(task, settings, 4), server_round=2)  # another partition in between
    second, _, _ = task.train_partition(settings, 3, ranks, received, server_round=2)
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
@pytest.mark.gpu
def test_cuda_bf16_training(task, tiny_model, data_path, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    settings = _settings(task, tiny_model, data_path, tmp_path, device="cuda", dtype="bfloat16", gradient_checkpointing=True)
    ranks, received = _round1(task, settings, 0)
    state, _, loss = task.train_partition(settings, 0, ranks, received, server_round=1)
    assert task.client_model(settings)[0].device.type == "cuda"
    assert {v.device.type for v in state.values()} == {"cpu"} and torch.isfinite(torch.tensor(loss))


def test_the_client_takes_the_servers_rank_map_after_the_core_checks_it(task, tiny_model, data_path, tmp_path):
    """The node trains at the map the server sent (it no longer re-derives it); a map its model
    cannot hold is a RankError before any adapter is built."""
    pytest.importorskip("flwr")
    import json

    from flwr.app import ConfigRecord

    from flexlora_plugin.core import RankError
    from flexlora_plugin.flower.records import RANK_MAP

    settings = _settings(task, tiny_model, data_path, tmp_path)
    client = task.flexlora_client(settings)[0]
    shapes = client.shapes

    def received_rank_map(_settings, config, pid):
        return client.rank_map_of(config, pid)

    sent = {m: 2 for m in shapes}
    assert received_rank_map(settings, ConfigRecord({RANK_MAP: json.dumps(sent)}), 0) == sent
    assert received_rank_map(
        settings,
        ConfigRecord(
            {
                RANK_MAP: json.dumps(
                    {"q_proj": 3, "k_proj": 3, "v_proj": 3, "o_proj": 3, "gate_proj": 3, "up_proj": 3, "down_proj": 3}
                )
            }
        ),
        0,
    ) == dict.fromkeys(shapes, 3)
    first = next(iter(shapes))
    with pytest.raises(RankError, match=f"client 0, module {first}"):
        received_rank_map(settings, ConfigRecord({RANK_MAP: json.dumps({**sent, first: 10**9})}), 0)
    with pytest.raises(RankError, match="not JSON"):
        received_rank_map(settings, ConfigRecord({RANK_MAP: "{"}), 0)


@pytest.mark.slow
def test_the_client_apps_train_is_receive_then_train_partition(task, tiny_model, data_path, tmp_path):
    """The ClientApp's ``train`` reads the strategy's message with ``FlexLoRAClient.receive``: its
    reply is exactly ``train_partition``'s on the same inputs; a message for another partition, or
    one with no rank map, is refused before anything trains."""
    import json
    import time

    from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

    from flexlora_plugin.core import RankError
    from flexlora_plugin.flower.records import (
        ARRAYS,
        CONFIG,
        METRICS,
        NUM_EXAMPLES,
        PARTITION_ID,
        RANK_MAP,
        SERVER_ROUND,
        record_to_state,
        state_to_record,
    )

    sys.path.insert(0, str(APP))
    try:
        from flexlora_app.client_app import train
    finally:
        sys.path.remove(str(APP))
    run_config = _run_config(tiny_model, data_path, tmp_path)
    settings = _settings(task, tiny_model, data_path, tmp_path)
    ranks, received = _round1(task, settings, 5)

    def message(**config):
        arrays, dtype_note = state_to_record(received)
        sent = ConfigRecord({**dtype_note, SERVER_ROUND: 2, PARTITION_ID: 5, RANK_MAP: json.dumps(ranks), **config})
        meta = Metadata(  # as the SuperNode delivers it
            run_id=0,
            message_id="m5",
            src_node_id=0,
            dst_node_id=1,
            reply_to_message_id="",
            group_id="",
            created_at=time.time(),
            ttl=60.0,
            message_type=MessageType.TRAIN,
        )
        return Message(content=RecordDict({ARRAYS: arrays, CONFIG: sent}), metadata=meta)

    def context(partition):
        return Context(run_id=0, node_id=1, node_config={PARTITION_ID: partition}, state=RecordDict(), run_config=run_config)

    reply = train(message(), context(5))
    expected, n, _ = task.train_partition(settings, 5, ranks, received, server_round=2)
    got = record_to_state(reply.content.array_records[ARRAYS], reply.content.config_records[CONFIG])
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert reply.content.metric_records[METRICS][NUM_EXAMPLES] == n
    with pytest.raises(ValueError, match="message for partition 5 reached partition 6"):
        train(message(), context(6))
    without_map = message()
    del without_map.content.config_records[CONFIG][RANK_MAP]
    with pytest.raises(RankError, match="partition 5: the train message has no 'rank-map'"):
        train(without_map, context(5))
