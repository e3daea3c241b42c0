"""The ClientApp side of :class:`~flexlora_plugin.flower.strategy.FlexLoRA`, for any Flower App.

A ClientApp that trains a peft LoRA model (a FlowerTune app, say) serves every method with three
calls: answer the strategy's rank query, take the received adapter, reply with what trained::

    app = ClientApp()

    @app.query(QUERY_RANK)
    def rank(msg, context):
        return flexlora(context).answer_rank_query(msg, context)

    @app.train()
    def train(msg, context):
        client = flexlora(context)          # one FlexLoRAClient per process (it holds the base model)
        got = client.receive(msg, context)  # got.model: the peft model at this partition's ranks
        ...train got.model's client.trainable() on partition got.partition, as before...
        return client.reply(msg, {"train_loss": loss, "num-examples": n})

The base model is loaded once per process and wrapped by the core's
:class:`~flexlora_plugin.core.ClientModel`: one adapter per distinct rank map, the method's
frozen factors frozen (FFA-LoRA's A), a cumulative method's base rebuilt (FLoRA).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from ..core import ClientModel, RankError, check_rank_map, to_wire
from .records import (
    METRICS,
    NUM_PARTITIONS,
    PARTITION_ID,
    POOL,
    RANK_INFO,
    RANK_MAP,
    SERVER_ROUND,
    pool_info_record,
    rank_info_record,
    record_to_state,
    state_to_record,
)

__all__ = ["FlexLoRAClient", "Received", "node_partition"]


def node_partition(node_config: Mapping[str, Any]) -> int | None:
    """The node's partition from its node config (``partition-id=N``); None for a pool node (``partition-id=any``).

    Raises
    ------
    KeyError
        The node config has no ``partition-id`` (start the SuperNode with ``--node-config``).
    """
    if PARTITION_ID not in node_config:
        raise KeyError(
            f"node config has no {PARTITION_ID!r} (start the SuperNode with --node-config 'partition-id=N' "
            f"or 'partition-id={POOL} num-partitions=N')"
        )
    value = node_config[PARTITION_ID]
    return None if str(value) == POOL else int(value)


@dataclass(frozen=True)
class Received:
    """A train message, read: the peft model ready to train, and what it was sent for."""

    model: Any
    partition: int
    round: int
    rank_map: dict[str, int]


class FlexLoRAClient:
    """One process's client of every method: the base model once, an adapter per rank map.

    Parameters
    ----------
    base : nn.Module
        A transformers causal LM on its device and in its dtype (peft injects LoRA layers into it:
        do not use it elsewhere).
    lora_alpha : float
        The federation's alpha (the strategy's ``lora_alpha``).
    target_modules : iterable of str
        Module-name suffixes to adapt (``q_proj`` ...), as the server's model shapes name them.
    method : str
        The strategy's method: which factors train and travel back. (default: "flexlora")
    seed : int
        The run seed, for the factors a method freezes (FFA-LoRA's A). (default: 0)
    wire_dtype : str
        Dtype of the reply's factors: "auto" (float32), "float32" or "bfloat16". (default: "auto")
    arrayrecord_key, configrecord_key : str
        The strategy's (``FedAvg``'s) record keys. (default: "arrays", "config")
    **model_options
        ``use_rslora``, ``lora_dropout``, ``gradient_checkpointing`` of :class:`ClientModel`.
    """

    def __init__(
        self,
        base: nn.Module,
        *,
        lora_alpha: float,
        target_modules: Iterable[str],
        method: str = "flexlora",
        seed: int = 0,
        wire_dtype: str = "auto",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        **model_options: Any,
    ) -> None:
        self.model = ClientModel(
            base, lora_alpha=lora_alpha, target_modules=target_modules, method=method, seed=seed, **model_options
        )
        self.wire_dtype = wire_dtype
        self.arrayrecord_key, self.configrecord_key = arrayrecord_key, configrecord_key

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Base-model module name -> ``(d_out, d_in)`` of every adapted module."""
        return self.model.shapes

    def answer_rank_query(self, msg: Message, context: Context, rank_map: Mapping[str, int] | None = None) -> Message:
        """The reply to the strategy's ``query.rank``: this node's partition, module shapes and, optionally, ranks.

        Without ``rank_map`` the server draws the partition's ranks from its profile. A pool node
        (``partition-id=any``) answers with its ``num-partitions`` instead.
        """
        pid = node_partition(context.node_config)
        if pid is None:
            if NUM_PARTITIONS not in context.node_config:
                raise KeyError(f"a {PARTITION_ID}={POOL} node needs {NUM_PARTITIONS!r} in its node config")
            if rank_map is not None:
                raise ValueError(f"a {PARTITION_ID}={POOL} node takes its ranks from the server's profile, not a rank map")
            record = pool_info_record(int(context.node_config[NUM_PARTITIONS]), self.shapes)
        else:
            record = rank_info_record(pid, rank_map, self.shapes)
        return Message(RecordDict({RANK_INFO: record}), reply_to=msg)

    def rank_map_of(self, config: Mapping[str, Any], partition: int) -> dict[str, int]:
        """The rank map the server sent, checked against this process's model by the core.

        Raises
        ------
        RankError
            No rank map (a strategy other than :class:`~flexlora_plugin.flower.strategy.FlexLoRA` sent
            the message), not a JSON object of module -> rank, or a rank this model cannot hold (e.g. 10**9).
        """
        if RANK_MAP not in config:
            raise RankError(f"partition {partition}: the train message has no {RANK_MAP!r}: send it with the FlexLoRA strategy")
        try:
            sent = json.loads(str(config[RANK_MAP]))
        except json.JSONDecodeError as err:
            raise RankError(f"partition {partition}: the server's rank map is not JSON: {err}") from None
        return check_rank_map(sent, self.shapes, client=partition)

    def receive(self, msg: Message, context: Context | None = None) -> Received:
        """Load a train message's factors into the adapter of its rank map; the peft model, ready to train.

        Only the factors the method trains have ``requires_grad`` (:meth:`trainable`).

        Raises
        ------
        ValueError
            The message names another partition than this node's own (node config ``partition-id``).
        RankError
            The rank map or the factors do not fit this model.
        """
        config = msg.content.config_records[self.configrecord_key]
        partition, rnd = int(config[PARTITION_ID]), int(config[SERVER_ROUND])
        own = node_partition(context.node_config) if context is not None and PARTITION_ID in context.node_config else None
        if own is not None and own != partition:
            raise ValueError(f"message for partition {partition} reached partition {own}")
        ranks = self.rank_map_of(config, partition)
        received = record_to_state(msg.content.array_records[self.arrayrecord_key], config)
        return Received(self.model.activate(ranks, received), partition, rnd, ranks)

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of what trains this round (for the optimizer, and FedProx's anchor)."""
        return self.model.trainable()

    def state(self) -> dict[str, Tensor]:
        """What travels back: the active adapter's trained factors (peft keys, float32, on the CPU)."""
        return self.model.state()

    def reply(self, msg: Message, metrics: Mapping[str, int | float]) -> Message:
        """The train reply: the trained factors (in the wire dtype) and ``metrics``.

        ``metrics`` must hold the strategy's ``weighted_by_key`` (``num-examples`` by default);
        ``train-loss`` or ``train_loss`` is recorded as the round's loss.
        """
        arrays, dtype_note = state_to_record(to_wire(self.state(), self.wire_dtype))
        return Message(
            RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: dtype_note, METRICS: MetricRecord(dict(metrics))}),
            reply_to=msg,
        )
