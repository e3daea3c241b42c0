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


def _settings(task, tiny_model, data_path, tmp_path, **overrides):
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
    settings = task.Settings.from_context(config, run_id=0)
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
