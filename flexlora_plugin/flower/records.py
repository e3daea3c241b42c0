"""Flower wire format of the FlexLoRA host: record keys and record <-> core conversions.

Every key that travels in a Flower ``Message`` is defined here, once. A train message carries
``"arrays"`` (the node's LoRA factors, an :class:`~flwr.app.ArrayRecord` in peft's key format)
and ``"config"`` (a :class:`~flwr.app.ConfigRecord` with the round, the dtype note and the run's
settings); a train reply carries ``"arrays"``, ``"config"`` (dtype note) and ``"metrics"``
(``num-examples``, ``train-loss``). The rank handshake is a ``query.rank`` message answered with
a ``"rank-info"`` ConfigRecord (``partition-id``, ``rank-map`` and ``module-shapes``, JSON objects:
the shapes let the server build the round-1 adapter without loading the model). A *pool* node
(node config ``partition-id=any``) serves whichever partition a train message names: it answers
``partition-id = "any"``, ``num-partitions`` and ``module-shapes``, and the server draws the
partitions' rank maps with the core's ``sample_ranks``, as the node itself would.

dtype policy: an ArrayRecord cannot hold bfloat16, so a bf16 tensor travels as its bit pattern
viewed as int16 and the record's ConfigRecord names the original dtype under ``array-dtypes``
(a JSON object ``{key: "bfloat16"}``); conversion back is bit-exact.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.constant import SType
from torch import Tensor

from .npy import decode_arrays

__all__ = [
    "ARRAYS",
    "ARRAY_DTYPES",
    "CONFIG",
    "METRICS",
    "MODULE_SHAPES",
    "NUM_PARTITIONS",
    "POOL",
    "NUM_EXAMPLES",
    "PARTITION_ID",
    "QUERY_RANK",
    "RANK_INFO",
    "RANK_MAP",
    "SERVER_ROUND",
    "TRAIN_LOSS",
    "pool_info_record",
    "rank_info_record",
    "read_pool_info",
    "read_rank_info",
    "record_to_state",
    "state_to_record",
]

logger = logging.getLogger(__name__)

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
RANK_INFO = "rank-info"
# query action: ``@app.query(QUERY_RANK)`` handles message type ``f"query.{QUERY_RANK}"``
QUERY_RANK = "rank"
# ConfigRecord / MetricRecord keys
SERVER_ROUND = "server-round"
PARTITION_ID = "partition-id"
RANK_MAP = "rank-map"
MODULE_SHAPES = "module-shapes"
NUM_PARTITIONS = "num-partitions"
POOL = "any"  # node config partition-id of a node serving any partition
ARRAY_DTYPES = "array-dtypes"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"

_VIEWED = {torch.bfloat16: torch.int16}


def state_to_record(state: Mapping[str, Tensor]) -> tuple[ArrayRecord, ConfigRecord]:
    """Pack a state dict into an ArrayRecord plus the ConfigRecord holding its dtype note.

    Parameters
    ----------
    state : Mapping[str, Tensor]
        Keys are preserved verbatim and in order; not modified.

    Returns
    -------
    tuple[ArrayRecord, ConfigRecord]
        The arrays (bf16 viewed as int16, everything contiguous on the CPU) and
        ``{ARRAY_DTYPES: json}`` naming each viewed key's original dtype.
    """
    packed: OrderedDict[str, Tensor] = OrderedDict()
    dtypes: dict[str, str] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_to_record: {key} is a {type(value).__name__}, not a torch.Tensor")
        value = value.detach().cpu().contiguous()
        if value.dtype in _VIEWED:
            dtypes[key] = str(value.dtype).removeprefix("torch.")
            value = value.view(_VIEWED[value.dtype])
        packed[key] = value
    return ArrayRecord(packed), ConfigRecord({ARRAY_DTYPES: json.dumps(dtypes)})


def record_to_state(arrays: ArrayRecord, config: ConfigRecord | None = None, *, pin: bool = False) -> dict[str, Tensor]:
    """Unpack :func:`state_to_record`'s output into a state dict (keys, order and dtypes restored).

    Every array's header is checked against its bytes before anything is allocated, then each is
    copied once into a new tensor (:func:`~.npy.decode_arrays`; Flower's ``to_torch_state_dict``
    allocates what the header claims first, and copies twice); with ``pin`` the tensors are
    page-locked, for a server that stages the factors on a GPU.

    Raises
    ------
    ValueError
        When an array is not valid npy data, or the dtype note is not valid JSON, names a key the
        record lacks, or an unsupported dtype.
    TypeError
        When an array is not of stype ``numpy.ndarray``.
    """
    note = str(config[ARRAY_DTYPES]) if config is not None and ARRAY_DTYPES in config else "{}"
    try:
        dtypes = json.loads(note)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ARRAY_DTYPES} is not valid JSON: {note[:80]!r}") from err
    if not isinstance(dtypes, dict):
        raise ValueError(f"{ARRAY_DTYPES} must be a JSON object {{key: dtype}}, got {note[:80]!r}")
    items = list(arrays.items())
    for key, array in items:
        if array.stype != SType.NUMPY:
            raise TypeError(f"array {key!r} has stype {array.stype!r}, not {SType.NUMPY!r}")
    state = dict(zip([key for key, _ in items], decode_arrays([array.data for _, array in items], pin=pin), strict=True))
    for key, name in dtypes.items():
        if key not in state:
            raise ValueError(f"{ARRAY_DTYPES} names {key!r}, which the ArrayRecord lacks")
        dtype = getattr(torch, str(name), None)
        if dtype not in _VIEWED:
            raise ValueError(f"{ARRAY_DTYPES}: {key!r} has unsupported dtype {name!r}")
        try:
            state[key] = state[key].view(dtype)
        except RuntimeError as err:  # e.g. an odd-width int8 array viewed as bf16
            shape, have = tuple(state[key].shape), state[key].dtype
            raise ValueError(f"{ARRAY_DTYPES}: {key!r} ({shape}, {have}) cannot be read as {name}: {err}") from err
    return state


def rank_info_record(
    partition_id: int, rank_map: Mapping[str, int] | None = None, shapes: Mapping[str, tuple[int, int]] | None = None
) -> ConfigRecord:
    """The query reply: a node's partition id, and optionally its rank map (``{module: rank}``) and module shapes.

    Without a rank map the server draws the partition's ranks from its profile (the draw the
    flower_app's nodes make for themselves); without shapes the server's model shapes
    (``FlexLoRA(module_shapes=...)``) are the only reference.
    """
    record = ConfigRecord({PARTITION_ID: int(partition_id)})
    if rank_map is not None:
        record[RANK_MAP] = json.dumps({str(k): int(v) for k, v in rank_map.items()})
    if shapes is not None:
        record[MODULE_SHAPES] = json.dumps({str(k): [int(d) for d in v] for k, v in shapes.items()})
    return record


def pool_info_record(num_partitions: int, shapes: Mapping[str, tuple[int, int]]) -> ConfigRecord:
    """The query reply of a pool node: it serves partitions ``0..num_partitions-1`` (those no other node claims)."""
    if num_partitions < 1:
        raise ValueError(f"a pool node needs num-partitions >= 1, got {num_partitions}")
    return ConfigRecord(
        {
            PARTITION_ID: POOL,
            NUM_PARTITIONS: int(num_partitions),
            MODULE_SHAPES: json.dumps({str(k): [int(d) for d in v] for k, v in shapes.items()}),
        }
    )


def read_pool_info(record: ConfigRecord) -> tuple[int, dict[str, tuple[int, int]]] | None:
    """``(num_partitions, module shapes)`` of a pool node's reply; None for a node with one partition."""
    if str(record.get(PARTITION_ID, "")) != POOL:
        return None
    if NUM_PARTITIONS not in record or MODULE_SHAPES not in record:
        raise ValueError(f"pool rank-info lacks {NUM_PARTITIONS!r} or {MODULE_SHAPES!r} (has {sorted(record)})")
    num = record[NUM_PARTITIONS]
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"{NUM_PARTITIONS} must be a positive int, got {num!r}")
    return int(num), _shapes(record)


MAX_RECORD_CHARS = 1 << 22
"""The longest JSON text a node's rank-info field may hold (4 Mi characters; a 7B model's shapes take ~15 k)."""
MAX_DIM = 1 << 20
"""The largest ``d_out`` or ``d_in`` a node may report for a module."""


def _json_object(record: ConfigRecord, key: str) -> dict[str, object]:
    text = record[key]
    if not isinstance(text, str) or len(text) > MAX_RECORD_CHARS:
        size = f"{len(text)} characters" if isinstance(text, str) else type(text).__name__
        raise ValueError(f"{key} must be JSON text of at most {MAX_RECORD_CHARS} characters, got {size}")
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{key} is not valid JSON: {text[:80]!r}") from err
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{key} must be a non-empty JSON object, got {value!r}"[:200])
    return value


def read_rank_info(record: ConfigRecord) -> tuple[int, dict[str, int] | None, dict[str, tuple[int, int]] | None]:
    """Inverse of :func:`rank_info_record`: ``(partition id, rank map or None, module shapes or None)``.

    Raises
    ------
    ValueError
        When the partition id is missing or not an int, a rank is not a positive int or a shape
        not two positive ints.
    """
    pid = record.get(PARTITION_ID)
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise ValueError(f"rank-info record needs an int {PARTITION_ID!r}, got {pid!r} (has {sorted(record)})")
    ranks = _json_object(record, RANK_MAP) if RANK_MAP in record else None
    bad = {k: v for k, v in (ranks or {}).items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise ValueError(f"{RANK_MAP}: ranks must be positive ints, got {bad}")
    shapes = _shapes(record) if MODULE_SHAPES in record else None
    return pid, ({str(k): int(v) for k, v in ranks.items()} if ranks is not None else None), shapes  # type: ignore[misc]


def _is_dim(d: object) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM


def _shapes(record: ConfigRecord) -> dict[str, tuple[int, int]]:
    shapes = _json_object(record, MODULE_SHAPES)

    def dims_ok(v: object) -> bool:
        return isinstance(v, list) and len(v) == 2 and all(_is_dim(d) for d in v)

    bad = {k: v for k, v in shapes.items() if not dims_ok(v)}
    if bad:
        raise ValueError(f"{MODULE_SHAPES}: each must be [d_out, d_in], ints in 1..{MAX_DIM}, got {dict(list(bad.items())[:3])}")
    return {str(k): (int(v[0]), int(v[1])) for k, v in shapes.items()}  # type: ignore[index]
