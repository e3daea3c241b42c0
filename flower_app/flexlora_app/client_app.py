"""FlexLoRA ClientApp: answers the rank query and trains its partition at its own LoRA rank(s)."""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flexlora_app.task import Settings, apply_fault, node_rank_map, route_logs, train_partition
from flexlora_plugin.flower.records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    QUERY_RANK,
    RANK_INFO,
    SERVER_ROUND,
    TRAIN_LOSS,
    rank_info_record,
    record_to_state,
    state_to_record,
)

logger = logging.getLogger(__name__)
app = ClientApp()


def _setup(context: Context) -> tuple[Settings, int]:
    route_logs(plugin_level=logging.WARNING)  # per-module rank clamping notices stay quiet
    settings = Settings.from_context(context.run_config, context.run_id)
    torch.set_num_threads(settings.torch_threads)
    if PARTITION_ID not in context.node_config:
        raise KeyError(f"node config has no {PARTITION_ID!r} (start the SuperNode with --node-config 'partition-id=N')")
    return settings, int(context.node_config[PARTITION_ID])


@app.query(QUERY_RANK)
def query_rank(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id and rank map."""
    settings, pid = _setup(context)
    ranks = node_rank_map(settings, context.node_config, pid)
    return Message(RecordDict({RANK_INFO: rank_info_record(pid, ranks)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received factors (if any), train ``local-steps`` steps, reply with the adapter."""
    settings, pid = _setup(context)
    config = msg.content.config_records[CONFIG]
    server_round = int(config[SERVER_ROUND])
    if int(config[PARTITION_ID]) != pid:
        raise ValueError(f"message for partition {config[PARTITION_ID]} reached partition {pid}")
    ranks = node_rank_map(settings, context.node_config, pid)
    received = record_to_state(msg.content.array_records[ARRAYS], config)
    state, num_examples, loss = train_partition(settings, pid, ranks, received, server_round)
    if pid in settings.faults:
        logger.warning("partition %d: test fault %r injected in round %d", pid, settings.faults[pid], server_round)
        state = apply_fault(state, settings.faults[pid])
    arrays, dtype_note = state_to_record(state)
    logger.info("partition %d round %d: %d examples, train loss %.4f", pid, server_round, num_examples, loss)
    metrics = MetricRecord({NUM_EXAMPLES: num_examples, TRAIN_LOSS: loss})
    return Message(RecordDict({ARRAYS: arrays, CONFIG: dtype_note, METRICS: metrics}), reply_to=msg)
