"""A test ClientApp: the shipped one, plus misbehaving partitions. Never part of the shipped app.

The ``fault_app`` fixture (tests/flower/conftest.py) copies ``flower_app/`` to a temporary folder,
adds this file as ``flexlora_app/fault_client.py`` and points the App's ``clientapp`` at it. Run
config ``fault-partition`` (comma list of partition ids) and ``fault-kind`` (matching list of
``nan`` | ``rank`` | ``raise`` | ``shapes``) choose who misbehaves: a NaN factor, a factor one rank
short, an exception (Flower's error reply), or a rank-query answer with other module shapes.
"""

from __future__ import annotations

import json
import logging

from flexlora_app import client_app as shipped
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flexlora_plugin.flower.records import (
    ARRAYS,
    CONFIG,
    MODULE_SHAPES,
    PARTITION_ID,
    QUERY_RANK,
    RANK_INFO,
    record_to_state,
    state_to_record,
)

KINDS = ("nan", "rank", "raise", "shapes")
logger = logging.getLogger(__name__)
app = ClientApp()


@app.query(QUERY_RANK)
def query_rank(msg: Message, context: Context) -> Message:
    reply = shipped.query_rank(msg, context)
    pid = context.node_config.get(PARTITION_ID)
    if faults(context.run_config).get(int(pid) if str(pid).isdigit() else -1) == "shapes":
        record = reply.content.config_records[RANK_INFO]
        shapes = json.loads(str(record[MODULE_SHAPES]))
        first = next(iter(shapes))
        shapes[first] = [shapes[first][0] + 1, shapes[first][1]]
        record[MODULE_SHAPES] = json.dumps(shapes)
        logger.warning("partition %s: test fault 'shapes' injected in the rank query", pid)
    return reply


def faults(run_config) -> dict[int, str]:
    pids = [int(p) for p in str(run_config.get("fault-partition", "")).split(",") if p.strip()]
    kinds = [k.strip() for k in str(run_config.get("fault-kind", "")).split(",") if k.strip()]
    if len(pids) != len(kinds) or not set(kinds) <= set(KINDS):
        raise ValueError(f"fault-partition {pids} and fault-kind {kinds} must pair up; kinds are {KINDS}")
    return dict(zip(pids, kinds, strict=True))


def corrupt(state: dict, kind: str) -> dict:
    """A NaN in the first lora_A (``nan``) or the first module one rank short (``rank``)."""
    out = {k: v.clone() for k, v in state.items()}
    first_a = next(k for k in out if ".lora_A." in k)
    first_b = first_a.replace(".lora_A.", ".lora_B.")
    if kind == "nan":
        out[first_a][0, 0] = float("nan")
    else:
        out[first_a], out[first_b] = out[first_a][:-1].contiguous(), out[first_b][:, :-1].contiguous()
    return out


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(msg.content.config_records[CONFIG][PARTITION_ID])
    kind = faults(context.run_config).get(pid)
    if kind == "raise":
        raise RuntimeError(f"deliberate client failure (partition {pid})")
    reply = shipped.train(msg, context)
    if kind is not None:
        logger.warning("partition %d: test fault %r injected", pid, kind)
        content = reply.content
        state = corrupt(record_to_state(content.array_records[ARRAYS], content.config_records[CONFIG]), kind)
        arrays, note = state_to_record(state)
        content[ARRAYS] = arrays
        content[CONFIG].update(note)
    return reply
