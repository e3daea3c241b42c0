"""``FlexLoRA``: a Flower (Message API) strategy for heterogeneous-rank federated LoRA.

The strategy only translates: every number comes from :mod:`flexlora_plugin.core`
(:class:`~flexlora_plugin.core.federation.Federation`: the rank maps, what each node receives,
the round's aggregation, the state file, the export).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from torch import Tensor

from ..core import (
    Federation,
    FlexLoRAConfig,
    GlobalUpdate,
    RankError,
    Reply,
    RoundResult,
    check_rank_map,
    module_infos,
    rank_label,
    state_nbytes,
    strict_majority,
)
from .records import (
    PARTITION_ID,
    QUERY_RANK,
    RANK_INFO,
    RANK_MAP,
    SERVER_ROUND,
    TRAIN_LOSS,
    read_pool_info,
    read_rank_info,
    record_to_state,
    state_to_record,
)

__all__ = ["FlexLoRA", "Nodes", "RoundRecord", "rank_label", "sample_partitions"]

logger = logging.getLogger(__name__)

#: Reply metrics read as the train loss, in this order (ours, then FlowerTune's).
LOSS_KEYS = (TRAIN_LOSS, "train_loss")


def sample_partitions(partition_ids: Iterable[int], k: int, *, seed: int, server_round: int) -> list[int]:
    """The ``k`` partitions trained in ``server_round``: a pure function of (seed, round, ids).

    Every method run with the same seed therefore trains the same clients in the same rounds.
    Returns them sorted.
    """
    ids = sorted(set(partition_ids))
    if not 1 <= k <= len(ids):
        raise ValueError(f"cannot sample {k} of {len(ids)} partitions")
    return sorted(random.Random(f"{seed}:{server_round}").sample(ids, k))


def _last_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of a (traceback-like) error reason, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "")[-limit:]


class Nodes:
    """Which node serves which partition, as the rank query found them.

    A node with a partition of its own (node config ``partition-id=N``) serves that partition; a
    *pool* node (``partition-id=any num-partitions=N``) serves any partition ``< N`` that no node
    claims, the sampled ones handed out round-robin.
    """

    def __init__(self) -> None:
        self.node_of: dict[int, int] = {}  # partition id -> the node that claimed it
        self.pool: list[int] = []  # nodes serving any partition
        self.pool_size = 0  # partitions 0..pool_size-1 not claimed by a node go to the pool

    def claim(self, partition: int, node: int) -> str | None:
        """Give ``partition`` to ``node``; the reason it is refused (another node holds it), else None."""
        holder = self.node_of.get(partition)
        if holder is not None and holder != node:
            return f"partition {partition} is already served by node {holder}"
        self.node_of[partition] = node
        return None

    def add_pool(self, node: int, num_partitions: int) -> None:
        """``node`` serves any of partitions ``0..num_partitions-1`` no node claims."""
        self.pool.append(node)
        self.pool_size = max(self.pool_size, num_partitions)

    def pool_partitions(self) -> list[int]:
        """The partitions the pool serves (none without a pool node)."""
        return [p for p in range(self.pool_size) if p not in self.node_of] if self.pool else []

    def route(self, partitions: Iterable[int]) -> list[int]:
        """The node each of ``partitions`` is sent to: its own node, else the pool round-robin in the given order."""
        nodes, pooled = [], 0
        for pid in partitions:
            if pid in self.node_of:
                nodes.append(self.node_of[pid])
            else:
                nodes.append(self.pool[pooled % len(self.pool)])
                pooled += 1
        return nodes

    def partition_of(self, node: int) -> int | None:
        """The partition a node of its own serves (None for a pool node or an unknown one)."""
        return next((p for p, n in self.node_of.items() if n == node), None)


@dataclass(frozen=True)
class RoundRecord:
    """What one round sent and received, handed to ``FlexLoRA(on_round=...)`` after it is aggregated.

    Attributes
    ----------
    round : int
        The global round (continuing after a resume).
    rank_maps : Mapping[int, Mapping[str, int]]
        Partition id -> the rank map it was sent.
    nodes : Mapping[int, int]
        Partition id -> the node the message went to.
    sent : Mapping[int, Mapping[str, Tensor]]
        Partition id -> the factors sent (peft keys, the wire dtype; for a cumulative method also
        the running total, one set of tensors shared by every partition: read-only).
    replies : Mapping[int, Reply]
        Partition id -> the decoded reply (factors, ``num_examples``, train loss) of every reply
        that decoded, usable or not; the core's verdict is in ``result``.
    result : RoundResult
        The core's round result: who was kept and excluded and why, energy, bytes.
    """

    round: int
    rank_maps: Mapping[int, Mapping[str, int]]
    nodes: Mapping[int, int]
    sent: Mapping[int, Mapping[str, Tensor]]
    replies: Mapping[int, Reply]
    result: RoundResult


@dataclass
class _Round:
    """The round in flight: (train message, partition) pairs and, for ``on_round``, what was sent."""

    messages: list[tuple[Message, int]] = field(default_factory=list)
    sent: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    nodes: dict[int, int] = field(default_factory=dict)
    nbytes: int = 0

    @cached_property
    def by_id(self) -> dict[str, int]:
        """Message id -> partition; read once the replies are in (the grid sets the ids when it sends)."""
        return {m.metadata.message_id: pid for m, pid in self.messages}


class FlexLoRA(FedAvg):
    """FlexLoRA, and every registered method, as a Flower (Message API) strategy.

    Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
    Client Resources", NeurIPS 2024, arXiv:2402.11505. Clients train LoRA adapters of different
    ranks. Each round the server forms, per module, ΔW = Σ_k p_k·s_k·B_k·A_k and sends every node
    factors at its own rank. ``method`` (a :class:`FlexLoRAConfig` field) switches to any method of
    :func:`~flexlora_plugin.core.list_methods` (``hetlora``, ``flora``, ``ffa-lora``, ``rbla``,
    ``fedavg``).

    It is a drop-in for Flower's ``FedAvg``: every ``FedAvg`` setting is honoured, with these
    meanings. ``fraction_train`` / ``min_train_nodes`` size each round's sample of *partitions*;
    ``min_available_nodes`` is what the rank query waits for; ``weighted_by_key`` is the reply
    metric read as ``p_k``; ``arrayrecord_key`` / ``configrecord_key`` name the records of train
    messages and replies; ``train_metrics_aggr_fn``, when given, adds its MetricRecord to the
    round's metrics; ``fraction_evaluate`` / ``min_evaluate_nodes`` / ``evaluate_metrics_aggr_fn``
    drive ``FedAvg``'s federated evaluation of the global adapter (off by default here).

    Parameters
    ----------
    config : FlexLoRAConfig, optional
        Core settings (method, profile, seed, lora_alpha...). Pass either this or its fields as
        keyword arguments. (default: ``FlexLoRAConfig(**config_fields)``)
    fraction_train, min_train_nodes : float, int
        Partitions trained per round: ``max(int(fraction_train · partitions), min_train_nodes)``,
        at most every eligible one. ``fraction_train`` must be in (0, 1]. (default: 1.0, 2)
    fraction_evaluate, min_evaluate_nodes, evaluate_metrics_aggr_fn
        ``FedAvg``'s federated evaluation: sampled nodes receive the global adapter (in
        ``arrayrecord_key``, peft keys, at ``export_ranks``) in an ``evaluate`` message. (default:
        0.0, off)
    min_available_nodes : int, optional
        Nodes the rank query waits for before it asks every connected node. (default: None: the
        nodes connected when it starts, every one of which must answer)
    weighted_by_key, arrayrecord_key, configrecord_key : str
        As in ``FedAvg``. (default: "num-examples", "arrays", "config")
    train_metrics_aggr_fn : callable, optional
        ``(list[RecordDict], weighted_by_key) -> MetricRecord`` over the usable replies' contents,
        merged into the round's metrics. (default: None: the core's row only)
    clients_per_round : int, optional
        Partitions trained per round, instead of ``fraction_train`` and ``min_train_nodes``.
    seed : int, optional
        Seed of the client sampling. (default: ``config.seed``)
    query_timeout : float
        Seconds to wait for ``min_available_nodes`` to connect and answer. (default: 120.0)
    module_shapes : Mapping[str, tuple[int, int]], optional
        The model's adapted modules, ``(d_out, d_in)`` by base-model name (e.g.
        :func:`~flexlora_plugin.core.model_shapes` of the model folder, read on the meta device):
        a node reporting other shapes is refused alone, and nodes may leave their shapes out.
        (default: None: the shapes a strict majority of the answering nodes report)
    max_partitions : int
        The most partitions a node may claim or a pool node may serve (partition ids
        ``0..max_partitions-1``); a node above it is refused. (default: 10000)
    state_path : path, optional
        Server state written after every round. (default: None)
    resume : bool
        Restore ``state_path`` when it exists and continue after its round. (default: False)
    record : Mapping, optional
        Saved with the server state every round (declared state fields: ``config``, the run's
        resolved settings, and ``versions``). (default: None)
    on_round : callable, optional
        Called with a :class:`RoundRecord` after every aggregated round (what was sent to and
        received from every partition), e.g. to save the factors. (default: None)
    export_ranks : "max", "exact", int or Mapping
        Rank(s) of the global adapter handed to ``evaluate_fn`` and federated evaluation each
        round, and kept in ``Result.arrays``: ``"max"`` each module at the largest rank a client trains
        for it, ``"exact"`` at the rank reproducing its ΔW to 1e-5 (near full rank for FlexLoRA:
        about the model's size), or the given rank(s). (default: "max")
    **config_fields
        ``FlexLoRAConfig`` fields when ``config`` is None.

    Notes
    -----
    Protocol (keys in :mod:`flexlora_plugin.flower.records`; the ClientApp side is
    :class:`~flexlora_plugin.flower.client.FlexLoRAClient`):

    1. before round 1, a ``query.rank`` message asks every node its partition id and, optionally,
       its rank map and module shapes; a node without a rank map gets the profile's draw
       for its partition. Each node is judged alone (:meth:`query_nodes`).
    2. ``configure_train`` samples partitions (:func:`sample_partitions`) and sends each one
       message with its own factors (``B = U_r S_r / s``, ``A = V_rᵀ`` for FlexLoRA) and, in the
       config record, ``server-round``, ``partition-id`` and ``rank-map``. Round 1 sends the
       core's common start for the run seed, the same for every method (:attr:`initial`).
    3. ``aggregate_train`` hands the replies to the core: a failed, malformed or non-finite reply
       is excluded from the round (logged at WARNING), never fatal; a round that cannot form a
       finite update keeps the previous one.

    The global update lives in :attr:`global_update`; ``aggregate_train`` returns it as a peft
    adapter at ``export_ranks`` (``base_model.model.<module>.lora_A.weight``...) whenever
    something reads it, which Flower hands to ``evaluate_fn`` and keeps in ``Result.arrays``.
    ``start(initial_arrays=...)`` takes an empty record or an untrained adapter (every ``lora_B``
    zero, as peft builds one): every method starts from the core's common start, whatever a
    node's initial adapter was.
    """

    def __init__(
        self,
        config: FlexLoRAConfig | None = None,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int | None = None,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        clients_per_round: int | None = None,
        seed: int | None = None,
        query_timeout: float = 120.0,
        module_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_partitions: int = 10_000,
        state_path: str | os.PathLike[str] | None = None,
        resume: bool = False,
        record: Mapping[str, Any] | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        export_ranks: str | int | Mapping[str, int] | None = "max",
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ValueError(f"pass a FlexLoRAConfig or its fields, not both (got fields {sorted(config_fields)})")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1] (a FlexLoRA round always trains), got {fraction_train}")
        if min_available_nodes is not None and min_available_nodes < 1:
            raise ValueError(f"min_available_nodes must be >= 1, got {min_available_nodes}")
        if isinstance(max_partitions, bool) or not isinstance(max_partitions, int) or max_partitions < 1:
            raise ValueError(f"max_partitions must be a positive int, got {max_partitions!r}")
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes or 1,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.config = config if config is not None else FlexLoRAConfig(**config_fields)
        self.clients_per_round = clients_per_round
        self.seed = self.config.seed if seed is None else int(seed)
        self.wait_for = min_available_nodes  # the rank query's; FedAvg's sampling reads min_available_nodes
        self.query_timeout = float(query_timeout)
        self.state_path = Path(state_path) if state_path is not None else None
        self.resume = resume
        self.record = dict(record or {})
        self.on_round = on_round
        self.export_ranks = export_ranks
        self.max_partitions = max_partitions
        self._merge_train_metrics = train_metrics_aggr_fn  # FedAvg's default would average our own metrics again
        self.federation: Federation | None = None  # the round protocol (core), made once the rank query has the shapes
        # base-model module -> (d_out, d_in): the model's (module_shapes), else the nodes' majority in the rank query
        self.module_shapes = {str(m): (int(a), int(b)) for m, (a, b) in module_shapes.items()} if module_shapes else None
        self.shapes: dict[str, tuple[int, int]] = dict(self.module_shapes or {})
        self.nodes = Nodes()
        self._round = _Round()
        self._clock: tuple[float, int] | None = None  # (start time, last round) of this start() call, for the ETA
        self._arrays_each_round = True
        self._offset = 0

    # ------------------------------------------------------------------ the core's round protocol
    @property
    def global_update(self) -> GlobalUpdate | None:
        """The current global update (None before the first aggregated round)."""
        return self.federation.global_update if self.federation is not None else None

    @property
    def round_offset(self) -> int:
        """Rounds done before this ``start()``: the restored state's round (0 for a fresh run)."""
        return self._offset

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per round (``metrics.json``), restored with the state."""
        return self.federation.history if self.federation is not None else []

    @property
    def rank_maps(self) -> dict[int, dict[str, int]]:
        """Partition id -> rank map (reported by its node, else drawn from the profile)."""
        return self.federation.rank_maps if self.federation is not None else {}  # type: ignore[return-value]

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any partition."""
        return self._federation().max_rank

    @property
    def initial(self) -> GlobalUpdate:
        """The round-1 adapter (core :func:`initial_update` for the queried shapes, rank maps and seed)."""
        return self._federation().initial

    def _federation(self) -> Federation:
        if self.federation is None:
            raise RuntimeError("the round protocol needs the nodes' module shapes: run query_nodes() first")
        return self.federation

    def global_arrays(self) -> ArrayRecord:
        """The global adapter at ``export_ranks`` as peft-keyed arrays (before round 1: the common start)."""
        tensors, _ = self._federation().adapter(self.export_ranks)
        return state_to_record(tensors)[0]

    def save_adapter(self, folder: str | os.PathLike[str], *, base_model_name_or_path: str | None = None) -> dict[str, int]:
        """Write the global adapter at ``export_ranks`` as a peft folder (``PeftModel.from_pretrained`` loads it).

        Returns the rank per module. Raises ``FlexLoRAError`` before any round produced an update.
        """
        return self._federation().export(folder, base_model_name_or_path=base_model_name_or_path, ranks=self.export_ranks)

    def summary(self) -> None:
        """Log this strategy's settings (Flower's ``Strategy.start`` calls it first)."""
        start = f"resumed after round {self.round_offset}" if self.round_offset else "fresh start"
        logger.info(
            "FlexLoRA strategy: method=%s, profile=%s, %d partitions, %s clients/round, seed=%d, lora_alpha=%g, %s",
            self.config.method,
            "rank table" if self.config.rank_table is not None else self.config.profile,
            len(self.rank_maps),
            self.clients_per_round or self._per_round(len(self.rank_maps)),
            self.seed,
            self.config.lora_alpha,
            start,
        )

    # ------------------------------------------------------------------ rank query
    def query_nodes(self, grid: Grid, timeout: float | None = None) -> dict[int, dict[str, int]]:
        """Ask every node its partition id and rank map (``query.rank``); wait with a deadline.

        Returns
        -------
        dict[int, dict[str, int]]
            Partition id -> rank map; also kept in :attr:`rank_maps` (nodes in :attr:`nodes`).

        Each node is judged alone: an error reply, a malformed or out-of-bounds record, other module
        shapes than :attr:`module_shapes` (or the nodes' majority), a partition an earlier node
        claimed, or a rank map that does not name every module exactly is refused with its reason
        (logged, and the node gets no partition); the others carry on.

        Raises
        ------
        TimeoutError
            When fewer than ``min_available_nodes`` nodes connect or reply in time, or no node
            answered usably; the message lists who answered, who was refused and why, and who was silent.
        """
        expected = self.wait_for
        deadline = time.monotonic() + (self.query_timeout if timeout is None else timeout)
        node_ids = sorted(grid.get_node_ids())
        while len(node_ids) < (expected or 1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {expected or 1} nodes connected: {node_ids}")
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        messages = [
            Message(
                RecordDict({self.configrecord_key: ConfigRecord()}),
                dst_node_id=nid,
                message_type=f"{MessageType.QUERY}.{QUERY_RANK}",
            )
            for nid in node_ids
        ]
        replies = list(grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())))
        answered, errors, reported = self._read_rank_replies(replies)
        self._start_federation(reported)
        want = expected if expected is not None else len(node_ids)
        silent = sorted(set(node_ids) - set(answered) - set(errors))
        if len(answered) + len(errors) < want or not answered:  # refused nodes replied: only silence (or nobody usable) fails
            raise TimeoutError(
                f"rank query: {len(answered)} of {want} nodes answered usably "
                f"(node -> partition {answered}); refused: {errors or 'none'}; no reply from {silent}"
            )
        if errors:
            logger.warning("rank query: %d node(s) refused, the others carry on: %s", len(errors), errors)
        logger.info(
            "rank query: %d nodes (%d serving any partition), ranks %s",
            len(answered),
            len(self.nodes.pool),
            {p: rank_label(m) for p, m in sorted(self.rank_maps.items())},
        )
        return dict(self.rank_maps)

    def _start_federation(self, reported: Mapping[int, dict[str, int] | None]) -> None:
        """The core :class:`Federation` for the queried shapes: reported rank maps set, the others drawn, state restored.

        The reported maps were checked by :meth:`_read_rank_replies` (a node with a map that does
        not fit the shapes was refused there, before it claimed a partition). A node that reported
        no map, and every pool partition, gets the core's ``sample_ranks(profile, partition, seed)``
        on the module shapes: the draw a flower_app node makes for itself.
        """
        if not self.shapes:
            return
        fed = Federation(
            self.config, module_infos(self.shapes), shapes=self.shapes, state_path=self.state_path, record=self.record
        )
        for pid, ranks in reported.items():
            if ranks is None:
                fed.draw_ranks(pid)
            else:
                fed.assign_ranks(pid, ranks)
        for pid in self.nodes.pool_partitions():
            fed.draw_ranks(pid)
        if self.resume and self.state_path is not None and self.state_path.exists():
            self._offset = fed.restore(self.state_path)
        elif self.resume:
            logger.warning("resume=true but there is no server state at %s: starting at round 1", self.state_path)
        self.federation = fed

    def _read_rank_replies(
        self, replies: list[Message]
    ) -> tuple[dict[int, int], dict[int, str], dict[int, dict[str, int] | None]]:
        """Each node's answer, judged alone; returns (node -> partition, node -> reason, partition -> reported map).

        A node with an error, a malformed record, numbers out of bounds, other module shapes than
        the reference, a partition an earlier node claimed, or a rank map that does not name every
        module exactly is refused with its reason; the others carry on.
        """
        answered: dict[int, int] = {}
        errors: dict[int, str] = {}
        reported: dict[int, dict[str, int] | None] = {}
        parsed: list[tuple[int, int | None, int, dict[str, int] | None, dict[str, tuple[int, int]] | None]] = []
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                errors[nid] = _last_line(reply.error.reason)
                logger.warning("rank query: node %d replied with an error: %s", nid, errors[nid])
                continue
            try:
                record = reply.content.config_records[RANK_INFO]
                pool = read_pool_info(record)
                pid, ranks, shapes = (-1, None, pool[1]) if pool is not None else read_rank_info(record)
                claimed = pool[0] if pool is not None else pid + 1  # partitions 0..claimed-1 must exist
                if (pool is None and pid < 0) or claimed > self.max_partitions:
                    what = f"num-partitions {pool[0]}" if pool is not None else f"partition {pid}"
                    raise ValueError(f"{what} is out of bounds: partitions 0..{self.max_partitions - 1} (max_partitions)")
            except (KeyError, TypeError, ValueError) as err:
                errors[nid] = f"malformed rank info: {err}"
                logger.warning("rank query: node %d sent malformed rank info: %s", nid, err)
                continue
            parsed.append((nid, pool[0] if pool is not None else None, pid, ranks, shapes))
        majority = strict_majority(tuple(sorted(p[4].items())) for p in parsed if p[4] is not None)  # the core's rule
        reference = self.module_shapes or (dict(majority) if majority is not None else None)
        for nid, pool_size, pid, ranks, shapes in parsed:
            if reference is None or (shapes is not None and shapes != reference):
                diff = sorted(set((shapes or {}).items()) ^ set((reference or {}).items()))[:3] if reference else []
                source = "the model's" if self.module_shapes else "a strict majority of the nodes'"
                errors[nid] = (
                    f"other module shapes than {source}: {diff}"
                    if reference
                    else "the nodes disagree on the module shapes (or send none) and no majority exists: pass module_shapes"
                )
                logger.warning("rank query: node %d (partition %s) refused: %s", nid, pid, errors[nid])
                continue
            if pool_size is not None:
                answered[nid] = pid
                self.nodes.add_pool(nid, pool_size)
                continue
            if ranks is not None:
                try:  # before it claims the partition: a node with a bad map takes nothing from an honest one
                    check_rank_map(ranks, reference, client=pid, exact=True)
                except RankError as err:
                    errors[nid] = f"rank map refused: {err}"
                    logger.warning("rank query: node %d (partition %d): %s", nid, pid, err)
                    continue
            taken = self.nodes.claim(pid, nid)
            if taken is not None:
                errors[nid] = taken
                logger.warning("rank query: node %d refused: %s", nid, taken)
                continue
            answered[nid], reported[pid] = pid, ranks
        if reference is not None:
            self.shapes = dict(reference)
        return answered, errors, reported

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run the rank query (unless done), then ``num_rounds`` rounds of Flower's ``Strategy.start``.

        ``evaluate_fn(round, arrays)`` and federated evaluation receive the global adapter at
        ``export_ranks`` every round (round 0: the common start, or the restored update);
        ``Result.arrays`` holds the last round's. After a resume,
        ``num_rounds`` counts the rounds still to run; round numbers in messages, logs, records and
        the state file continue from the restored round.

        Raises
        ------
        ValueError
            ``initial_arrays`` holds a trained adapter (a nonzero ``lora_B``): every method starts
            from the core's common start.
        """
        _check_initial(initial_arrays)
        if self.federation is None:
            self.query_nodes(grid)
        self._clock = (time.perf_counter(), self.round_offset + num_rounds)
        # the adapter is exported every round only when something reads it (else the last round's is Result.arrays)
        self._arrays_each_round = evaluate_fn is not None or self.fraction_evaluate > 0
        return super().start(
            grid,
            self.global_arrays(),
            num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    # ------------------------------------------------------------------ train
    def _per_round(self, partitions: int) -> int:
        """``FedAvg``'s sample size over ``partitions``: ``max(int(fraction_train · n), min_train_nodes)``."""
        return self.clients_per_round or max(int(partitions * self.fraction_train), self.min_train_nodes, 1)

    def sampled_partitions(self, server_round: int) -> list[int]:
        """Partitions trained in (global) round ``server_round``: a pure function of (seed, round, eligible set).

        Eligible: every partition, minus those the core dropped after ``drop_after_failures``
        rounds excluded in a row (off by default; the dropped set is saved with the state).
        """
        k = self._per_round(len(self.rank_maps))
        eligible = self._federation().eligible(self.rank_maps) if self.federation is not None else sorted(self.rank_maps)
        if not eligible:
            raise RuntimeError(
                f"round {server_round}: every partition was dropped after "
                f"{self.config.drop_after_failures} rounds excluded in a row; nothing left to sample"
            )
        return sample_partitions(eligible, min(k, len(eligible)), seed=self.seed, server_round=server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled partition, carrying its own factors; ``config`` is copied, never mutated."""
        rnd = server_round + self.round_offset
        pids = self.sampled_partitions(rnd)
        self._round = now = _Round()
        for pid, node in zip(pids, self.nodes.route(pids), strict=True):
            state = self._federation().factors_for(pid)
            now.nbytes += state_nbytes(state)
            record, dtype_note = state_to_record(state)
            node_config = ConfigRecord(dict(config))
            node_config.update({**dtype_note, SERVER_ROUND: rnd, PARTITION_ID: pid, RANK_MAP: json.dumps(self.rank_maps[pid])})
            message = Message(
                RecordDict({self.arrayrecord_key: record, self.configrecord_key: node_config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            now.messages.append((message, pid))  # message ids are set when the grid sends them
            now.nodes[pid] = node
            if self.on_round is not None:
                now.sent[pid] = state
        logger.info("round %d: sending to partitions %s (%.3f MB)", rnd, pids, now.nbytes / 1e6)
        return [m for m, _ in now.messages]

    def _pid_of(self, reply: Message) -> int | None:
        """The partition a train reply answers: by the message it replies to, else by its node."""
        pid = self._round.by_id.get(reply.metadata.reply_to_message_id)
        return pid if pid is not None else self.nodes.partition_of(reply.metadata.src_node_id)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the decoded replies to the core; return the global adapter and the round's metrics.

        Failed, malformed or non-finite replies are excluded. The arrays are the global adapter at
        ``export_ranks`` when something reads them this round (``evaluate_fn``, federated
        evaluation, or the last round's ``Result.arrays``), else None (Flower keeps the previous
        ones); None too while no round has formed a global update.
        """
        rnd = server_round + self.round_offset
        replies = list(replies)
        decoded, failed = self._read_train_replies(rnd, replies)
        fed = self._federation()
        result = fed.aggregate(decoded, failed=failed, bytes_sent=self._round.nbytes, round=rnd)
        if not result.updated and decoded:
            logger.error("round %d: no usable reply, the global update is unchanged", rnd)
        for pid, reason in sorted(result.excluded.items()):
            logger.warning("round %d: partition %d (node %s) excluded: %s", rnd, pid, self.nodes.node_of.get(pid), reason)
        row = result.row()
        self._log_round(rnd, row)
        metrics = MetricRecord({k: v for k, v in row.items() if _is_metric(v)})  # the reasons are logged above
        if self._merge_train_metrics is not None:
            kept = [r.content for r in replies if not r.has_error() and self._pid_of(r) in result.kept]
            if kept:
                metrics.update(self._merge_train_metrics(kept, self.weighted_by_key))
        if self.on_round is not None:
            now = self._round
            maps = {p: self.rank_maps[p] for p in now.nodes}
            self.on_round(RoundRecord(rnd, maps, dict(now.nodes), dict(now.sent), dict(decoded), result))
        last = self._clock[1] if self._clock is not None else rnd
        wanted = self._arrays_each_round or rnd >= last
        return (self.global_arrays() if wanted and self.global_update is not None else None), metrics

    def _read_train_replies(self, rnd: int, replies: list[Message]) -> tuple[dict[int, Reply], dict[int, str]]:
        """Decode train replies into core :class:`Reply` objects; error or undecodable replies into reasons."""
        decoded: dict[int, Reply] = {}
        failed: dict[int, str] = {}
        pin = self.federation is not None and self.federation.pin_replies
        for reply in replies:
            nid = reply.metadata.src_node_id
            pid = self._pid_of(reply)
            if pid is None:
                logger.warning("round %d: reply from unknown node %d ignored", rnd, nid)
                continue
            if reply.has_error():
                decoded.pop(pid, None)
                failed[pid] = f"error reply (code {reply.error.code}): {_last_line(reply.error.reason)}"
                continue
            try:
                content = reply.content
                state = record_to_state(
                    content.array_records[self.arrayrecord_key], content.config_records.get(self.configrecord_key), pin=pin
                )
                if len(content.metric_records) != 1:
                    raise ValueError(f"expected one MetricRecord, got {sorted(content.metric_records)}")
                metrics = next(iter(content.metric_records.values()))
                weight = float(metrics[self.weighted_by_key])
                loss = next((float(metrics[k]) for k in LOSS_KEYS if k in metrics), math.nan)  # type: ignore[arg-type]
            except (KeyError, TypeError, ValueError) as err:
                failed[pid] = f"malformed reply: {err!r}"
                continue
            if pid in decoded or pid in failed:  # a second reply for one partition: neither can be trusted
                decoded.pop(pid, None)
                failed[pid] = f"two replies for partition {pid} in one round (node {nid} and another); both dropped"
                continue
            decoded[pid] = Reply(state, weight, loss)
        for _, pid in self._round.messages:  # sampled, yet nothing came back: a dead node, or the round timed out
            if pid not in decoded and pid not in failed:
                node = self.nodes.node_of.get(pid, "of the pool")
                failed[pid] = f"no reply this round (node {node} unavailable, or the round timed out)"
        return decoded, failed

    def _log_round(self, rnd: int, row: Mapping[str, Any]) -> None:
        energy = {k.removeprefix("energy-"): round(v, 4) for k, v in row.items() if k.startswith("energy-")}
        start, last = self._clock if self._clock is not None else (time.perf_counter(), rnd)
        elapsed, done = time.perf_counter() - start, rnd - self.round_offset
        eta = elapsed / max(done, 1) * max(last - rnd, 0)  # mean round so far (evaluation included) x rounds left
        resumed = f" (resumed after {self.round_offset})" if self.round_offset else ""
        logger.info(
            "round %d/%d%s: %d/%d clients ok, train loss %.4f, sent %.3f MB, received %.3f MB, energy kept %s, excluded %s; "
            "%.0f s elapsed, ETA %.0f s",
            rnd,
            last,
            resumed,
            row["clients-ok"],
            row["clients"],
            row[TRAIN_LOSS],
            row["bytes-sent"] / 1e6,
            row["bytes-received"] / 1e6,
            energy,
            row["excluded-partitions"],
            elapsed,
            eta,
        )


def _is_metric(value: Any) -> bool:
    """What a MetricRecord holds: a number or a list of numbers (no text, no mapping)."""
    number = (int, float)
    return (isinstance(value, number) and not isinstance(value, bool)) or (
        isinstance(value, list) and all(isinstance(v, number) and not isinstance(v, bool) for v in value)
    )


def _check_initial(arrays: ArrayRecord | None) -> None:
    """Refuse a trained initial adapter in one line; an empty record or an untrained one (B = 0) is fine."""
    if arrays is None or not len(arrays):
        return
    trained = [k for k, a in arrays.items() if ".lora_B." in k and a.numpy().any()]
    if trained:
        raise ValueError(
            f"initial_arrays holds a trained adapter ({len(trained)} nonzero lora_B, e.g. {trained[0]!r}): every method "
            "starts from the core's common start (B = 0); pass an empty ArrayRecord or an untrained adapter"
        )
