"""FlexLoRA ClientApp: answers the rank query and trains its partition at its own LoRA rank(s)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexlora_app.task import Settings, flexlora_client, node_rank_map, route_logs, train_active
from flexlora_plugin.flower.client import node_partition
from flexlora_plugin.flower.records import NUM_EXAMPLES, PARTITION_ID, POOL, QUERY_RANK, TRAIN_LOSS

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
    pid = node_partition(context.node_config)
    if pid is None and ("rank" in context.node_config or "lora-type" in context.node_config):
        raise ValueError(f"a {PARTITION_ID}={POOL} node takes its ranks from the profile: drop 'rank' / 'lora-type'")
    return settings, pid


@app.query(QUERY_RANK)
def query_rank(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id, rank map and module shapes (a pool node: its partition count)."""
    settings, pid = _setup(context)
    client, _ = flexlora_client(settings)
    ranks = node_rank_map(settings, context.node_config, pid) if pid is not None else None
    return client.answer_rank_query(msg, context, ranks)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the received factors, train ``local-steps`` steps on ``device``, reply with the adapter."""
    settings, _ = _setup(context)
    client, _ = flexlora_client(settings)
    got = client.receive(msg, context)  # the node's partition checked, the server's rank map checked by the core
    num_examples, loss = train_active(settings, got.partition, got.round)
    logger.info("partition %d round %d: %d examples, train loss %.4f", got.partition, got.round, num_examples, loss)
    return client.reply(msg, {NUM_EXAMPLES: num_examples, TRAIN_LOSS: loss})
