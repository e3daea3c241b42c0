"""``FlexLoRA``: a Flower (Message API) strategy for heterogeneous-rank federated LoRA.

The strategy only translates: every number comes from :mod:`flexlora_plugin.core`
(:func:`~flexlora_plugin.core.aggregate`, :meth:`GlobalUpdate.project`, ``energy_kept``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from safetensors.torch import save_file
from torch import Tensor

from ..core import (
    Federation,
    FlexLoRAConfig,
    GlobalUpdate,
    RankError,
    Reply,
    check_rank_map,
    module_infos,
    rank_label,
    state_nbytes,
    strict_majority,
)
from .records import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
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

__all__ = ["FlexLoRA", "rank_label", "sample_partitions"]

logger = logging.getLogger(__name__)


def sample_partitions(partition_ids: Iterable[int], k: int, *, seed: int, server_round: int) -> list[int]:
    """The ``k`` partitions trained in ``server_round``: a pure function of (seed, round, ids).

    Every method (flexlora, hetlora, fedavg) run with the same seed therefore trains the same
    clients in the same rounds. Returns them sorted.
    """
    ids = sorted(set(partition_ids))
    if not 1 <= k <= len(ids):
        raise ValueError(f"cannot sample {k} of {len(ids)} partitions")
    return sorted(random.Random(f"{seed}:{server_round}").sample(ids, k))


def _last_line(text: str | None, limit: int = 300) -> str:
    """The last non-empty line of a (traceback-like) error reason, at most ``limit`` characters."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return (lines[-1] if lines else "")[-limit:]


class FlexLoRA(FedAvg):
    """FlexLoRA on Flower's Message API: heterogeneous-rank LoRA aggregated by truncated SVD.

    Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
    Client Resources", NeurIPS 2024, arXiv:2402.11505. Clients train LoRA adapters of different
    ranks. Each round the server forms, per module, ΔW = Σ_k p_k·s_k·B_k·A_k and sends every node
    factors at its own rank.

    Parameters
    ----------
    config : FlexLoRAConfig, optional
        Core settings (method, profile, seed, lora_alpha...). Pass either this or its fields as
        keyword arguments. (default: ``FlexLoRAConfig(**config_fields)``)
    clients_per_round : int, optional
        Partitions trained per round (default: ``fraction_train`` of the queried nodes, at least 1).
    fraction_train : float
        Used when ``clients_per_round`` is None. (default: 1.0)
    seed : int, optional
        Seed of the client sampling. (default: ``config.seed``)
    expected_nodes : int, optional
        Nodes the rank query waits for. (default: the nodes connected when the query starts)
    query_timeout : float
        Seconds to wait for ``expected_nodes`` to connect and answer. (default: 120.0)
    module_shapes : Mapping[str, tuple[int, int]], optional
        The model's adapted modules, ``(d_out, d_in)`` by base-model name (e.g.
        :func:`~flexlora_plugin.core.model_shapes` of the model folder, read on the meta device):
        a node reporting other shapes is refused alone. (default: None: the shapes a strict
        majority of the answering nodes report; without one the query fails)
    max_partitions : int
        The most partitions a node may claim or a pool node may serve (partition ids
        ``0..max_partitions-1``); a node above it is refused. (default: 10000)
    state_path : path, optional
        Server state written after every round with ``save_server_state``. (default: None)
    resume : bool
        Restore ``state_path`` when it exists and continue after its round. (default: False)
    record : Mapping, optional
        Saved with the server state every round (declared state fields: ``config``, the run's
        resolved settings, and ``versions``). (default: None)
    dump_dir : path, optional
        For tests: per round, the factors sent to and received from every partition as
        safetensors (``round-NNN/sent-pK.safetensors``, ``reply-pK.safetensors``). (default: None)
    export_ranks : "max", "exact", int or Mapping
        Rank(s) of the final adapter that :meth:`start` returns in ``Result.arrays`` (peft keys,
        ``base_model.model.<module>.lora_A.weight``...): ``"max"`` each module at the largest rank
        a client trains for it, ``"exact"`` at the rank reproducing its ΔW to 1e-5 (near full rank
        for FlexLoRA: about the model's size), or the given rank(s). (default: "max")
    **config_fields
        ``FlexLoRAConfig`` fields when ``config`` is None.

    Notes
    -----
    Protocol (keys in :mod:`flexlora_plugin.flower.records`):

    1. before round 1, a ``query.rank`` message asks every node its partition id and rank map;
    2. ``configure_train`` samples partitions (:func:`sample_partitions`) and sends each node one
       message with ``update.project(rank_map, lora_alpha=α)``: ``B = U_r S_r / s``, ``A = V_rᵀ``,
       so that ``s·B·A`` is the best rank-``r`` approximation of ΔW. Round 1 sends the core's
       :func:`~flexlora_plugin.core.initial_update` for the run seed, the same for every method:
       ``B = 0`` and the first ``r`` rows of one common ``A`` per module (:attr:`initial`);
    3. ``aggregate_train`` logs failed replies at WARNING and calls ``aggregate(...,
       on_invalid="exclude")``: a malformed (wrong rank, bad keys) or non-finite reply is left out
       of the round, not fatal. ``p_k`` is the reply's ``num-examples``.

    ``fedavg`` and ``hetlora`` (``config.method``) run the same code. Aggregation runs in the
    config's ``compute_dtype`` (float32 by default); factors are sent in the adapters' dtype.
    The global update lives in :attr:`global_update`; rounds pass an empty ArrayRecord to Flower
    (each node gets its own factors), and :meth:`start` returns the final global adapter in
    ``Result.arrays``. Federated evaluation is off (``configure_evaluate`` returns no message).

    The class subclasses Flower's ``FedAvg`` for its sampling knobs (``fraction_train``,
    ``min_available_nodes``) and its ``start`` loop; every step of a round (``configure_train``,
    ``aggregate_train``) is our own, translating to the core's
    :class:`~flexlora_plugin.core.federation.Federation`.
    """

    def __init__(
        self,
        config: FlexLoRAConfig | None = None,
        *,
        clients_per_round: int | None = None,
        fraction_train: float = 1.0,
        seed: int | None = None,
        expected_nodes: int | None = None,
        query_timeout: float = 120.0,
        module_shapes: Mapping[str, tuple[int, int]] | None = None,
        max_partitions: int = 10_000,
        state_path: str | os.PathLike[str] | None = None,
        resume: bool = False,
        record: Mapping[str, Any] | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
        export_ranks: str | int | Mapping[str, int] | None = "max",
        **config_fields: Any,
    ) -> None:
        if config is not None and config_fields:
            raise ValueError(f"pass a FlexLoRAConfig or its fields, not both (got fields {sorted(config_fields)})")
        if clients_per_round is not None and clients_per_round < 1:
            raise ValueError(f"clients_per_round must be >= 1, got {clients_per_round}")
        if not 0.0 < fraction_train <= 1.0:
            raise ValueError(f"fraction_train must be in (0, 1], got {fraction_train}")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=0.0, min_available_nodes=expected_nodes or 1)
        self.config = config if config is not None else FlexLoRAConfig(**config_fields)
        self.clients_per_round = clients_per_round
        self.seed = self.config.seed if seed is None else int(seed)
        self.expected_nodes = expected_nodes
        self.query_timeout = float(query_timeout)
        self.state_path = Path(state_path) if state_path is not None else None
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.resume = resume
        self.record = dict(record or {})
        self.export_ranks = export_ranks
        if isinstance(max_partitions, bool) or not isinstance(max_partitions, int) or max_partitions < 1:
            raise ValueError(f"max_partitions must be a positive int, got {max_partitions!r}")
        self.max_partitions = max_partitions
        self.federation: Federation | None = None  # the round protocol (core), made once the rank query has the shapes
        # base-model module -> (d_out, d_in): the model's (module_shapes), else the nodes' majority in the rank query
        self.module_shapes = {str(m): (int(a), int(b)) for m, (a, b) in module_shapes.items()} if module_shapes else None
        self.shapes: dict[str, tuple[int, int]] = dict(self.module_shapes or {})
        self.node_of: dict[int, int] = {}  # partition id -> node id of a node serving one partition
        self.pool_nodes: list[int] = []  # nodes serving any partition (node config partition-id=any)
        self._pool_size = 0  # partitions 0.._pool_size-1 not claimed by a single-partition node go to the pool
        self._in_flight: list[tuple[Message, int]] = []  # (train message, partition id) of the round in flight
        self._sent_bytes = 0  # of the round in flight
        self._clock: tuple[float, int] | None = None  # (start time, last round) of this start() call, for the ETA
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
        """Partition id -> rank map (from the rank query; pool partitions drawn from the profile)."""
        return self.federation.rank_maps if self.federation is not None else {}  # type: ignore[return-value]

    @property
    def max_rank(self) -> int:
        """The largest rank of any module of any queried node."""
        return self._federation().max_rank

    @property
    def initial(self) -> GlobalUpdate:
        """The round-1 adapter (core :func:`initial_update` for the queried shapes, rank maps and seed)."""
        return self._federation().initial

    def _federation(self) -> Federation:
        if self.federation is None:
            raise RuntimeError("the round protocol needs the nodes' module shapes: run query_nodes() first")
        return self.federation

    def summary(self) -> None:
        """Log this strategy's settings (Flower's ``Strategy.start`` calls it first)."""
        start = f"resumed after round {self.round_offset}" if self.round_offset else "fresh start"
        logger.info(
            "FlexLoRA strategy: method=%s, profile=%s, %d nodes, %s clients/round, seed=%d, lora_alpha=%g, %s",
            self.config.method,
            "rank table" if self.config.rank_table is not None else self.config.profile,
            len(self.rank_maps),
            self.clients_per_round or f"{self.fraction_train:.0%} of the",
            self.seed,
            self.config.lora_alpha,
            start,
        )

    # ------------------------------------------------------------------ rank query
    def query_nodes(
        self, grid: Grid, expected_nodes: int | None = None, timeout: float | None = None
    ) -> dict[int, dict[str, int]]:
        """Ask every node its partition id and rank map (``query.rank``); wait with a deadline.

        Returns
        -------
        dict[int, dict[str, int]]
            Partition id -> rank map; also kept in :attr:`rank_maps` (node ids in :attr:`node_of`).

        Each node is judged alone: an error reply, a malformed or out-of-bounds record, other module
        shapes than :attr:`module_shapes` (or the nodes' majority), a partition an earlier node
        claimed, or a rank map that does not name every module exactly is refused with its reason
        (logged, and the node gets no partition); the others carry on.

        Raises
        ------
        TimeoutError
            When fewer than ``expected_nodes`` nodes connect or reply in time, or no node answered
            usably; the message lists who answered, who was refused and why, and who was silent.
        """
        expected = expected_nodes or self.expected_nodes
        deadline = time.monotonic() + (self.query_timeout if timeout is None else timeout)
        node_ids = sorted(grid.get_node_ids())
        while expected is not None and len(node_ids) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(node_ids)} of {expected} nodes connected: {node_ids}")
            time.sleep(0.5)
            node_ids = sorted(grid.get_node_ids())
        messages = [
            Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=nid, message_type=f"{MessageType.QUERY}.{QUERY_RANK}")
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
            len(self.pool_nodes),
            {p: rank_label(m) for p, m in sorted(self.rank_maps.items())},
        )
        return dict(self.rank_maps)

    def _start_federation(self, reported: dict[int, dict[str, int]]) -> None:
        """The core :class:`Federation` for the queried shapes: node rank maps set, pool partitions drawn, state restored.

        The nodes' maps were checked by :meth:`_read_rank_replies` (a node with a map that does
        not fit the shapes was refused there, before it claimed a partition). Every partition ``< num-partitions`` that no
        single-partition node claims goes to the pool; its rank map comes from the core's
        ``sample_ranks(profile, partition, seed)`` on the nodes' module shapes: the draw a
        single-partition node makes for itself.
        """
        if not self.shapes:
            return
        fed = Federation(
            self.config, module_infos(self.shapes), shapes=self.shapes, state_path=self.state_path, record=self.record
        )
        for pid, ranks in reported.items():  # each checked in _read_rank_replies, against these shapes
            fed.assign_ranks(pid, ranks)
        if self.pool_nodes:
            for pid in range(self._pool_size):
                if pid not in self.node_of:
                    fed.draw_ranks(pid)
        if self.resume and self.state_path is not None and self.state_path.exists():
            self._offset = fed.restore(self.state_path)
        elif self.resume:
            logger.warning("resume=true but there is no server state at %s: starting at round 1", self.state_path)
        self.federation = fed

    def _read_rank_replies(self, replies: list[Message]) -> tuple[dict[int, int], dict[int, str], dict[int, dict[str, int]]]:
        """Each node's answer, judged alone; returns (node -> partition, node -> reason, partition -> reported map).

        A node with an error, a malformed record, numbers out of bounds, other module shapes than
        the reference, a partition an earlier node claimed, or a rank map that does not name every
        module exactly is refused with its reason; the others carry on.
        """
        answered: dict[int, int] = {}
        errors: dict[int, str] = {}
        reported: dict[int, dict[str, int]] = {}
        parsed: list[tuple[int, int | None, int, dict[str, int], dict[str, tuple[int, int]]]] = []
        for reply in replies:
            nid = reply.metadata.src_node_id
            if reply.has_error():
                errors[nid] = _last_line(reply.error.reason)
                logger.warning("rank query: node %d replied with an error: %s", nid, errors[nid])
                continue
            try:
                record = reply.content.config_records[RANK_INFO]
                pool = read_pool_info(record)
                pid, ranks, shapes = (-1, {}, pool[1]) if pool is not None else read_rank_info(record)
                claimed = pool[0] if pool is not None else pid + 1  # partitions 0..claimed-1 must exist
                if (pool is None and pid < 0) or claimed > self.max_partitions:
                    what = f"num-partitions {pool[0]}" if pool is not None else f"partition {pid}"
                    raise ValueError(f"{what} is out of bounds: partitions 0..{self.max_partitions - 1} (max_partitions)")
            except (KeyError, TypeError, ValueError) as err:
                errors[nid] = f"malformed rank info: {err}"
                logger.warning("rank query: node %d sent malformed rank info: %s", nid, err)
                continue
            parsed.append((nid, pool[0] if pool is not None else None, pid, ranks, shapes))
        majority = strict_majority(tuple(sorted(p[4].items())) for p in parsed)  # the core's rule for peers' disagreements
        reference = self.module_shapes or (dict(majority) if majority is not None else None)
        for nid, pool_size, pid, ranks, shapes in parsed:
            if reference is None or shapes != reference:
                diff = sorted(set(shapes.items()) ^ set((reference or {}).items()))[:3] if reference else []
                source = "the model's" if self.module_shapes else "a strict majority of the nodes'"
                errors[nid] = (
                    f"other module shapes than {source}: {diff}"
                    if reference
                    else "the nodes disagree on the module shapes and no majority exists: pass module_shapes"
                )
                logger.warning("rank query: node %d (partition %s) refused: %s", nid, pid, errors[nid])
                continue
            if pool_size is not None:
                answered[nid] = pid
                self.pool_nodes.append(nid)
                self._pool_size = max(self._pool_size, pool_size)
                continue
            if pid in self.node_of and self.node_of[pid] != nid:
                errors[nid] = f"partition {pid} is already served by node {self.node_of[pid]}"
                logger.warning("rank query: node %d refused: %s", nid, errors[nid])
                continue
            try:  # before it claims the partition: a node with a bad map takes nothing from an honest one
                check_rank_map(ranks, reference, client=pid, exact=True)
            except RankError as err:
                errors[nid] = f"rank map refused: {err}"
                logger.warning("rank query: node %d (partition %d): %s", nid, pid, err)
                continue
            answered[nid] = pid
            self.node_of[pid], reported[pid] = nid, ranks
        if reference is not None:
            self.shapes = dict(reference)
        return answered, errors, reported

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 3, **kwargs: Any) -> Result:
        """Run the rank query (unless done) and then ``num_rounds`` rounds of :meth:`Strategy.start`.

        After a resume, ``num_rounds`` counts the rounds still to run; round numbers in messages,
        logs, dumps and the state file continue from the restored round.
        """
        if self.federation is None:
            self.query_nodes(grid)
        self._clock = (time.perf_counter(), self.round_offset + num_rounds)
        result = super().start(grid, initial_arrays if initial_arrays is not None else ArrayRecord(), num_rounds, **kwargs)
        if self.global_update is not None:  # the final global model, where Flower users look for it
            tensors, _ = self._federation().adapter(self.export_ranks)
            result.arrays = state_to_record(tensors)[0]
        return result

    # ------------------------------------------------------------------ train
    def sampled_partitions(self, server_round: int) -> list[int]:
        """Partitions trained in (global) round ``server_round``: a pure function of (seed, round, eligible set).

        Eligible: every partition, minus those the core dropped after ``drop_after_failures``
        rounds excluded in a row (off by default; the dropped set is saved with the state).
        """
        n = len(self.rank_maps)
        k = self.clients_per_round or max(1, int(n * self.fraction_train))
        eligible = self._federation().eligible(self.rank_maps) if self.federation is not None else sorted(self.rank_maps)
        if not eligible:
            raise RuntimeError(
                f"round {server_round}: every partition was dropped after "
                f"{self.config.drop_after_failures} rounds excluded in a row; nothing left to sample"
            )
        return sample_partitions(eligible, min(k, len(eligible)), seed=self.seed, server_round=server_round)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """One message per sampled node, carrying that node's own factors; ``config`` is copied, never mutated."""
        rnd = server_round + self.round_offset
        messages, sent_bytes, pids = [], 0, []
        pooled = 0
        for pid in self.sampled_partitions(rnd):
            if pid in self.node_of:
                node = self.node_of[pid]
            else:  # round-robin over the pool nodes, in sampled order
                node, pooled = self.pool_nodes[pooled % len(self.pool_nodes)], pooled + 1
            pids.append(pid)
            state = self._factors_for(pid)
            sent_bytes += state_nbytes(state)
            record, dtype_note = state_to_record(state)
            node_config = ConfigRecord(dict(config))
            node_config.update({**dtype_note, SERVER_ROUND: rnd, PARTITION_ID: pid, RANK_MAP: json.dumps(self.rank_maps[pid])})
            messages.append(
                Message(
                    RecordDict({ARRAYS: record, CONFIG: node_config}),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                )
            )
            self._dump(rnd, f"sent-p{pid}", state, {"node-id": str(node), RANK_MAP: json.dumps(self.rank_maps[pid])})
        self._sent_bytes = sent_bytes
        self._in_flight = list(zip(messages, pids, strict=True))  # message ids are set when the grid sends them
        logger.info("round %d: sending to partitions %s (%.3f MB)", rnd, pids, sent_bytes / 1e6)
        return messages

    def _factors_for(self, pid: int) -> dict[str, Tensor]:
        return self._federation().factors_for(pid)

    def _pid_of(self, reply: Message) -> int | None:
        """The partition a train reply answers: by the message it replies to, else by its node."""
        sent = {m.metadata.message_id: pid for m, pid in self._in_flight}
        pid = sent.get(reply.metadata.reply_to_message_id)
        if pid is not None:
            return pid
        nid = reply.metadata.src_node_id
        return next((p for p, n in self.node_of.items() if n == nid), None)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode the replies and hand them to the core's round protocol; failed, malformed or non-finite ones are excluded."""
        rnd = server_round + self.round_offset
        decoded, failed = self._read_train_replies(rnd, list(replies))
        result = self._federation().aggregate(decoded, failed=failed, bytes_sent=self._sent_bytes, round=rnd)
        if not result.updated and decoded:
            logger.error("round %d: no usable reply, the global update is unchanged", rnd)
        for pid, reason in sorted(result.excluded.items()):
            logger.warning("round %d: partition %d (node %s) excluded: %s", rnd, pid, self.node_of.get(pid), reason)
        row = result.row()
        self._log_round(rnd, row)
        return ArrayRecord(), MetricRecord({k: v for k, v in row.items() if k != "excluded-reasons"})

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
                state = record_to_state(content.array_records[ARRAYS], content.config_records.get(CONFIG), pin=pin)
                metrics = content.metric_records[METRICS]
                weight, loss = float(metrics[NUM_EXAMPLES]), float(metrics.get(TRAIN_LOSS, math.nan))
            except (KeyError, TypeError, ValueError) as err:
                failed[pid] = f"malformed reply: {err!r}"
                continue
            if pid in decoded or pid in failed:  # a second reply for one partition: neither can be trusted
                decoded.pop(pid, None)
                failed[pid] = f"two replies for partition {pid} in one round (node {nid} and another); both dropped"
                continue
            decoded[pid] = Reply(state, weight, loss)
            self._dump(rnd, f"reply-p{pid}", state, {NUM_EXAMPLES: str(weight), TRAIN_LOSS: str(loss)})
        for _, pid in self._in_flight:  # sampled, yet nothing came back: a dead node, or the round timed out
            if pid not in decoded and pid not in failed:
                node = self.node_of.get(pid, "of the pool")
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

    # ------------------------------------------------------------------ evaluate (off)
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No federated evaluation: evaluate the exported adapter instead."""
        return []

    # ------------------------------------------------------------------ test dumps
    def _dump(self, rnd: int, name: str, state: Mapping[str, Tensor], meta: Mapping[Hashable, str]) -> None:
        if self.dump_dir is None:
            return
        folder = self.dump_dir / f"round-{rnd:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={str(k): str(v) for k, v in meta.items()})
