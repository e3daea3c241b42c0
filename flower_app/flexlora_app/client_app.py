"""FlexLoRA ClientApp: answers the rank query and trains its partition at its own LoRA rank(s)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora_app.task import Settings, client_model, node_rank_map, route_logs, train_partition
from flexlora_plugin.core import RankError, check_rank_map, to_wire
from flexlora_plugin.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    POOL,
    QUERY_RANK,
    RANK_INFO,
    RANK_MAP,
    SERVER_ROUND,
    TRAIN_LOSS,
    pool_info_record,
    rank_info_record,
    record_to_state,
    state_to_record,
)

logger = logging.getLogger(__name__)
app = ClientApp()


def _setup(context: Context) -> tuple[Settings, int | None]:
    """The run settings (node config ``device`` overrides run config ``device``) and this node's partition.

    The partition is None for a pool node (node config ``partition-id=any``): it trains whichever
    partition a message names (Flower 1.42's SuperNode runs each message in a fresh ClientApp
    process, so there the base is loaded per message; in simulation a Ray actor keeps it).
    """
    route_logs(plugin_level=logging.WARNING)  # per-module rank clamping notices stay quiet
    settings = Settings.from_context(context.run_config, context.run_id)
    if "device" in context.node_config:  # e.g. --node-config "partition-id=any device='cuda:1'"
        settings = replace(settings, device=str(context.node_config["device"]))
    torch.set_num_threads(settings.torch_threads)
    if PARTITION_ID not in context.node_config:
        raise KeyError(
            f"node config has no {PARTITION_ID!r} (start the SuperNode with --node-config 'partition-id=N' "
            f"or 'partition-id={POOL} num-partitions=N')"
        )
    if str(context.node_config[PARTITION_ID]) == POOL:
        if "rank" in context.node_config or "lora-type" in context.node_config:
            raise ValueError(f"a {PARTITION_ID}={POOL} node takes its ranks from the profile: drop 'rank' / 'lora-type'")
        return settings, None
    return settings, int(context.node_config[PARTITION_ID])


@app.query(QUERY_RANK)
def query_rank(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id, rank map and module shapes (a pool node: its partition count)."""
    settings, pid = _setup(context)
    shapes = client_model(settings)[0].shapes
    if pid is None:
        if NUM_PARTITIONS not in context.node_config:
            raise KeyError(f"a {PARTITION_ID}={POOL} node needs {NUM_PARTITIONS!r} in its node config")
        record = pool_info_record(int(context.node_config[NUM_PARTITIONS]), shapes)
    else:
        record = rank_info_record(pid, node_rank_map(settings, context.node_config, pid), shapes)
    return Message(RecordDict({RANK_INFO: record}), reply_to=msg)


def received_rank_map(settings: Settings, config: Any, pid: int) -> dict[str, int]:
    """The rank map the server sent, checked against this process's model by the core.

    The server's map is authoritative: it took it from this node's own query reply, or drew it
    from the profile for a pool node. The node no longer re-derives it.

    Raises
    ------
    RankError
        Not a JSON object of module -> rank, or a rank this model cannot hold (e.g. 10**9).
    """
    try:
        sent = json.loads(str(config[RANK_MAP]))
    except json.JSONDecodeError as err:
        raise RankError(f"partition {pid}: the server's rank map is not JSON: {err}") from None
    return check_rank_map(sent, client_model(settings)[0].shapes, client=pid)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received factors, train ``local-steps`` steps on ``device``, reply with the adapter."""
    settings, node_pid = _setup(context)
    config = msg.content.config_records[CONFIG]
    server_round, pid = int(config[SERVER_ROUND]), int(config[PARTITION_ID])
    if node_pid is not None and pid != node_pid:
        raise ValueError(f"message for partition {pid} reached partition {node_pid}")
    if RANK_MAP in config:
        ranks = received_rank_map(settings, config, pid)
    else:  # a strategy that sends no rank map: the node's own draw
        ranks = node_rank_map(settings, context.node_config if node_pid is not None else {}, pid)
    received = record_to_state(msg.content.array_records[ARRAYS], config)
    state, num_examples, loss = train_partition(settings, pid, ranks, received, server_round)
    arrays, dtype_note = state_to_record(to_wire(state, settings.wire_dtype))
    dtype_note[PARTITION_ID] = pid
    logger.info("partition %d round %d: %d examples, train loss %.4f", pid, server_round, num_examples, loss)
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, TRAIN_LOSS: loss})
    return Message(RecordDict({ARRAYS: arrays, CONFIG: dtype_note, METRICS: metrics}), reply_to=msg)
